"""What a format's step actions receive (RunContext) and return (StepOutcome)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import supervisor
from .errors import Interrupted, OutputExistsError, UsageError
from .failures import error_for
from .hub import ModelSource
from .plan import Plan
from .request import Request
from .supervisor import ProcessResult


class Reporter(Protocol):
    """Where progress goes. The CLI renders it; formats never touch a terminal."""

    def step_started(self, step_id: str, label: str) -> None: ...
    def step_progress(self, step_id: str, done: float, total: float | None, unit: str) -> None: ...
    def step_finished(self, step_id: str, state: str, detail: str) -> None: ...
    def artifact_ready(self, step_id: str, path: str, info: dict[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...


class NullReporter:
    def step_started(self, step_id: str, label: str) -> None:
        pass

    def step_progress(self, step_id: str, done: float, total: float | None, unit: str) -> None:
        pass

    def step_finished(self, step_id: str, state: str, detail: str) -> None:
        pass

    def artifact_ready(self, step_id: str, path: str, info: dict[str, Any]) -> None:
        pass

    def warning(self, message: str) -> None:
        pass


@dataclass
class RunContext:
    request: Request
    source: ModelSource
    output: Path
    reporter: Reporter
    plan: Plan
    calib: Path | None = None  # plain-text calibration file, resolved before planning
    parameters: int = 0  # the source model's parameter count (for estimates)
    # facts earlier steps recorded (e.g. the 16-bit tensor count), keyed by step id
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # journals the pid of a started child so a later run can reap it if we die hard
    on_child_start: Callable[[int, float], None] | None = None

    @property
    def checkpoint(self) -> Path:
        return self.output / ".checkpoint"

    @property
    def work(self) -> Path:
        return self.checkpoint / "work"

    def log_path(self, step_id: str) -> Path:
        return self.checkpoint / "logs" / (step_id.replace(":", "-") + ".log")

    @property
    def threads(self) -> int:
        return self.request.threads or (os.cpu_count() or 1)

    def plan_outputs(self, step_id: str) -> tuple[str, ...]:
        return self.plan.by_id()[step_id].outputs

    def calib_text(self) -> Path:
        if self.calib is None:
            raise UsageError("this step needs calibration text", hint="Pass --calib FILE.txt.")
        return self.calib

    def check_final(self, final: Path) -> None:
        """Refuse to replace an existing final artifact without --force."""
        if final.exists() and not self.request.force:
            raise OutputExistsError(
                f"{final} already exists", hint="Pass --force to overwrite it, or choose another --output."
            )


def place(partial: Path, final: Path) -> None:
    """Rename a validated file or folder to its final name (replacing one only with --force,
    which the step checked before)."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(partial, final)


@dataclass
class StepOutcome:
    """What an action produced: output files (absolute) and facts for later steps/report."""

    outputs: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    # validated (partial, final) pairs: the runner journals "done" with the final names
    # first, then renames, so a kill between the two never leaves an unexplained final file
    renames: list[tuple[Path, Path]] = field(default_factory=list)


class _Parser(Protocol):
    def feed(self, line: str) -> Any: ...


def run_tool(
    ctx: RunContext,
    step_id: str,
    argv: list[str | os.PathLike[str]],
    *,
    what: str,
    parser: _Parser | None = None,
    env: dict[str, str | None] | None = None,
    on_event: Callable[[str], None] | None = None,
    use_pty: bool = False,
    oom_extra: str = "",
    cwd: Path | None = None,
) -> ProcessResult:
    """Run one supervised tool for a step: progress to the reporter, output to the step
    log, its pid to the journal; a failure becomes the matching QwrapError."""

    def on_line(line: str) -> None:
        if parser is not None:
            p = parser.feed(line)
            if p is not None:
                ctx.reporter.step_progress(step_id, p.done, p.total, p.unit)

    result = supervisor.run(
        argv,
        env=env,
        log_path=ctx.log_path(step_id),
        on_line=on_line,
        on_event=on_event,
        on_start=ctx.on_child_start,
        use_pty=use_pty,
        cwd=cwd,
        stall_timeout=ctx.request.stall_timeout,
    )
    if result.stopped_by_signal is not None:
        raise Interrupted(f"{what} stopped", signum=result.stopped_by_signal)
    if not result.ok:
        raise error_for(result, what, oom_extra=oom_extra)
    return result
