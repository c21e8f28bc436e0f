"""What a step action receives (its inputs' outputs and a narrow StepContext) and returns
(a StepOutcome). Actions never see the request or the plan: only their own step."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import OutputExistsError

if TYPE_CHECKING:  # the supervisor (psutil, subprocess) loads only when a step runs: --help stays fast
    from .children import LineParser
    from .supervisor import ProcessResult


class Reporter(Protocol):
    """Where progress goes. The CLI renders it; formats never touch a terminal. Called from
    the threads that run steps, so implementations must be thread-safe."""

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


@dataclass(frozen=True)
class InputOutputs:
    """One input step's outputs (absolute paths, in its declared order) and the facts it returned."""

    paths: tuple[Path, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.paths[0]


Inputs = Mapping[str, InputOutputs]  # by the role the step gave the input


@dataclass(frozen=True)
class StepContext:
    """The runtime a step gets: where to write, how many threads, where progress and logs go."""

    step_id: str
    output: Path
    reporter: Reporter
    threads: int = 1
    stall_timeout: float | None = 600.0
    force: bool = False
    # journals the pid of a started child so a later run can reap it if we die hard
    on_child_start: Callable[[int, float], None] | None = None

    @property
    def checkpoint(self) -> Path:
        return self.output / ".checkpoint"

    @property
    def log_path(self) -> Path:
        return self.checkpoint / "logs" / (self.step_id.replace(":", "-") + ".log")

    def path(self, rel: str) -> Path:
        return self.output / rel

    def progress(self, done: float, total: float | None, unit: str) -> None:
        self.reporter.step_progress(self.step_id, done, total, unit)

    def warning(self, message: str) -> None:
        self.reporter.warning(f"{self.step_id}: {message}")

    def check_final(self, final: Path) -> None:
        """Refuse to replace an existing final artifact without --force."""
        if final.exists() and not self.force:
            raise OutputExistsError(
                f"{final} already exists", hint="Pass --force to overwrite it, or choose another --output."
            )

    def run_tool(
        self,
        argv: list[str | os.PathLike[str]],
        *,
        what: str,
        parser: LineParser | None = None,
        env: dict[str, str | None] | None = None,
        on_event: Callable[[str], None] | None = None,
        use_pty: bool = False,
        oom_extra: str = "",
        cwd: Path | None = None,
    ) -> ProcessResult:
        """Run one supervised child for this step: progress to the reporter, output to the step
        log, its pid to the journal; a failure becomes the matching QwrapError."""
        from .children import run_checked

        return run_checked(
            argv, what=what, log_path=self.log_path, env=env, cwd=cwd, parser=parser,
            on_progress=self.progress, on_event=on_event, on_start=self.on_child_start,
            use_pty=use_pty, stall_timeout=self.stall_timeout, oom_extra=oom_extra,
        )


def place(partial: Path, final: Path) -> None:
    """Rename a validated file or folder to its final name (replacing one only with --force,
    which the step checked before)."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(partial, final)


@dataclass(frozen=True)
class StepOutcome:
    """What an action produced: output files (absolute) and its facts (journaled, handed to the
    steps that read its outputs, and shown in the result)."""

    outputs: tuple[Path, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    # validated (partial, final) pairs: the runner journals "done" with the final names
    # first, then renames, so a kill between the two never leaves an unexplained final file
    renames: tuple[tuple[Path, Path], ...] = ()
