"""What the benchmarks share: an offline model built with the converter environment's Python,
results written as JSON under bench/results/, timed tool runs (wall and CPU seconds), a
watched qwrap run (the parent process' own peak RSS and CPU, the output folder's size over
time), the step journal, and the hand-run GGUF commands qwrap stands for."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "wrapper"))

from qwrap import envs  # noqa: E402

QWRAP = REPO / ".venv" / "bin" / "qwrap"
RESULTS = REPO / "bench" / "results"
VALIDATE_PROMPT = "Once upon a time"


def build_model(folder: Path, *args: str) -> Path:
    """A model made offline by scripts/make-tiny-model (e.g. "--params-100m")."""
    python = envs.find_env("convert").python
    subprocess.run([str(python), str(REPO / "scripts" / "make-tiny-model"), str(folder), *args],
                   check=True, stdout=subprocess.DEVNULL)
    return folder


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def stamp() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- timed runs --------------------------------------------------------------------------


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Timed:
    wall: float
    cpu: float  # user + system seconds of the process and every descendant it waited for


def run_timed(argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> Timed:
    """Run to completion (check=True, output discarded unless it fails)."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=err, **kwargs)
        if proc.returncode:
            err.seek(0)
            sys.stderr.write(err.read()[-4000:].decode(errors="replace"))
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return Timed(time.perf_counter() - t0, _children_cpu() - cpu0)


def _proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _proc_own_cpu(pid: int) -> float | None:
    """utime + stime of the process itself (not its children), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_bytes(root: Path) -> int:
    """Apparent size of every file under root (files may vanish while we look)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except OSError:
                pass
    return total


@dataclass
class Watched:
    wall: float
    cpu: float  # qwrap and all its tools (RUSAGE_CHILDREN delta)
    parent_cpu: float  # the qwrap process alone (last /proc sample before it exited)
    parent_peak_rss: int  # VmHWM of the qwrap process alone, bytes
    disk: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), bytes under watch_dir)
    stdout: str = ""


def run_watched(argv: Sequence[str | os.PathLike[str]], watch_dir: Path | None = None,
                interval: float = 0.05, disk_interval: float = 0.25) -> Watched:
    """Run argv, polling its own /proc entry (peak RSS = VmHWM, own CPU) and the size of
    watch_dir. Only that one pid is measured, not the tools it starts."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    hwm_kb, own_cpu, disk, next_disk = 0, 0.0, [], 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err)
        while proc.poll() is None:
            hwm_kb = max(hwm_kb, _proc_status_kb(proc.pid, "VmHWM") or 0)
            own_cpu = max(own_cpu, _proc_own_cpu(proc.pid) or 0.0)
            now = time.perf_counter()
            if watch_dir is not None and now >= next_disk:
                disk.append((time.time(), tree_bytes(watch_dir)))
                next_disk = now + disk_interval
            time.sleep(interval)
        wall = time.perf_counter() - t0
        if watch_dir is not None:
            disk.append((time.time(), tree_bytes(watch_dir)))
        out.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode:
            err.seek(0)
            sys.stderr.write(err.read()[-4000:].decode(errors="replace"))
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return Watched(wall, _children_cpu() - cpu0, own_cpu, hwm_kb * 1024, disk, stdout)


# -- the step journal --------------------------------------------------------------------


def journal_steps(output: Path) -> dict[str, dict[str, Any]]:
    """Per step id: the last 'done' record, plus "started_t" (time.time() of its start)."""
    path = output / ".checkpoint" / "journal.jsonl"
    steps: dict[str, dict[str, Any]] = {}
    started: dict[str, float] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "step" not in r:
            continue
        if r.get("state") == "started":
            started[r["step"]] = r.get("t", 0.0)
        elif r.get("state") == "done":
            steps[r["step"]] = {**r, "started_t": started.get(r["step"])}
    return steps


def steps_union_seconds(steps: dict[str, dict[str, Any]]) -> float:
    """Wall time covered by at least one step (steps may run concurrently)."""
    spans = sorted((r["started_t"], r["t"]) for r in steps.values() if r.get("started_t") and r.get("t"))
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def disk_peak_between(disk: list[tuple[float, int]], start: float | None, end: float | None) -> int | None:
    inside = [b for t, b in disk if (start is None or t >= start) and (end is None or t <= end)]
    return max(inside) if inside else None


def disk_at(disk: list[tuple[float, int]], when: float | None) -> int:
    """OUT's size when a step started: the first sample at or after `when` (a sample taken
    just before may still miss the previous step's last writes), else the last one."""
    after = [b for t, b in disk if when is None or t >= when]
    return after[0] if after else (disk[-1][1] if disk else 0)


# -- the commands qwrap runs for GGUF, by hand ------------------------------------------


def source_outtype(model: Path) -> str:
    """What qwrap picks by default: bf16 for bf16 weights, else f16."""
    config = json.loads((model / "config.json").read_text())
    return "bf16" if (config.get("torch_dtype") or config.get("dtype")) == "bfloat16" else "f16"


def tool_paths() -> tuple[Path, Path, Path, Path]:
    """(converter python, convert_hf_to_gguf.py, llama-quantize, llama-simple)."""
    from qwrap.toolchain import find_toolchain

    t = find_toolchain()
    return (envs.find_env("convert").python, t.converter, t.tool("llama-quantize"), t.tool("llama-simple"))


def hand_gguf(model: Path, work: Path, quants: Sequence[str], threads: int | None = None) -> dict[str, Timed]:
    """convert to 16-bit, llama-quantize each type (all threads), llama-simple each type:
    qwrap's GGUF steps as plain sequential commands. Returns per-step timings."""
    python, converter, quantize, simple = tool_paths()
    threads = threads or os.cpu_count() or 1
    outtype = source_outtype(model)
    f16 = work / f"hand-{outtype.upper()}.gguf"
    steps = {"gguf.convert": run_timed([python, converter, model, "--outfile", f16, "--outtype", outtype])}
    for q in quants:
        steps[f"gguf.quantize:{q}"] = run_timed([quantize, f16, work / f"hand-{q}.gguf", q, str(threads)])
    for q in quants:
        steps[f"gguf.validate:{q}"] = run_timed([simple, "-m", work / f"hand-{q}.gguf", "-n", "8", VALIDATE_PROMPT])
    for p in [f16, *(work / f"hand-{q}.gguf" for q in quants)]:
        p.unlink(missing_ok=True)
    return steps


def qwrap_run_argv(model: Path, out: Path, quants: Sequence[str], *extra: str) -> list[str]:
    return [str(QWRAP), "run", str(model), "-o", str(out), *[a for q in quants for a in ("-q", q)], *extra]
