"""A plan cut into stages for a scheduler: one job per stage, one task per step of it.

A stage is the steps of one kind (every quantization, every validation, ...) that need the same
kind of machine; they never read one another, so a scheduler runs them as one array. A stage
waits for the stages its steps read. Its requests come from the plan's estimates: the largest
peak memory and time of its steps, with head room, and cores for a multi-threaded tool.
Everything here is a pure function of the plan, so the same plan gives the same stages.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from .plan import Plan, Step

MEM_HEADROOM = 1.5  # estimates are measured peaks; allocators and page cache vary
MEM_FLOOR = 1 << 30
TIME_HEADROOM = 3.0  # estimates come from a 2-core VM; a busy node is slower
TIME_FLOOR_S = 600.0
TIME_UNKNOWN_S = 4 * 3600.0  # a step without a cost model
DEFAULT_CPUS = 4  # for a multi-threaded tool, when --jobs does not say


@dataclass(frozen=True)
class Stage:
    name: str  # the steps' kind, e.g. "gguf.quantize"
    steps: tuple[Step, ...]
    after: tuple[str, ...]  # the stages it reads, by name
    gpu: bool
    cpus: int
    mem_bytes: int
    seconds: int

    @property
    def step_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.steps)


@dataclass(frozen=True)
class TaskCommand:
    """How a job calls qwrap: the program, the run options, and the output folder."""

    program: tuple[str, ...]  # e.g. ("qwrap",) or (python, "-m", "qwrap.cli")
    model: str
    output: Path
    options: tuple[str, ...]  # every option of the plan's request but -o (tokens never)

    def shell(self, output: str | None = None, *extra: str) -> str:
        """``qwrap run MODEL -o OUT [options] [extra]``; ``output`` is a shell word to use
        instead of the folder (e.g. ``"$QWRAP_STORE"``); ``extra`` words are not quoted."""
        out = output if output is not None else shlex.quote(str(self.output))
        head = shlex.join([*self.program, "run", self.model, "-o"])
        return " ".join([head, out, *(shlex.quote(o) for o in self.options), *extra])


def stages(plan: Plan, *, cpus: int = 0) -> list[Stage]:
    """The plan's stages in an order where every stage comes after those it reads."""
    for by_depth in (False, True):  # by depth only when kinds alone would make stages read themselves
        groups = _groups(plan, by_depth=by_depth)
        of = {s.id: name for name, steps in groups.items() for s in steps}
        after = {name: tuple(dict.fromkeys(of[i] for s in steps for i in s.input_ids)) for name, steps in groups.items()}
        order = _ordered(after)
        if order is not None:
            return [_stage(name, groups[name], after[name], cpus or DEFAULT_CPUS) for name in order]
    raise AssertionError("stages by depth always have an order")


def _groups(plan: Plan, *, by_depth: bool) -> dict[str, list[Step]]:
    """Steps by kind and machine (and depth in the DAG), in plan order."""
    depth: dict[str, int] = {}
    groups: dict[str, list[Step]] = {}
    for s in plan.steps:
        depth[s.id] = 1 + max((depth[i] for i in s.input_ids), default=-1)
        name = s.kind + ("@gpu" if s.gpu else "") + (f"-{depth[s.id]}" if by_depth else "")
        groups.setdefault(name, []).append(s)
    return groups


def _ordered(after: dict[str, tuple[str, ...]]) -> list[str] | None:
    """Topological order (None if there is none); among stages ready together, plan order."""
    done: list[str] = []
    left = list(after)
    while left:
        name = next((n for n in left if all(a in done for a in after[n] if a != n)), None)
        if name is None or name in after[name]:
            return None
        done.append(name)
        left.remove(name)
    return done


def _stage(name: str, steps: list[Step], after: tuple[str, ...], cpus: int) -> Stage:
    mem = max(s.estimate.peak_ram_bytes for s in steps)
    times = [s.estimate.seconds for s in steps]
    seconds = TIME_UNKNOWN_S if None in times else max(TIME_FLOOR_S, TIME_HEADROOM * max(t or 0.0 for t in times))
    return Stage(name, tuple(steps), after, any(s.gpu for s in steps),
                 cpus if any(s.threaded for s in steps) else 1,
                 max(MEM_FLOOR, _round_mib(mem * MEM_HEADROOM)), int(math.ceil(seconds / 60.0) * 60))


def _round_mib(n: float) -> int:
    return int(math.ceil(n / (1 << 20))) << 20


def write_files(dest: Path, files: dict[str, str], *, executable: bool) -> list[Path]:
    """Each file written under a temporary name beside it, then renamed."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        final = dest / name
        tmp = final.with_name(f".{name}.partial")
        tmp.write_text(text)
        tmp.chmod(0o755 if executable else 0o644)
        tmp.replace(final)
        written.append(final)
    return written
