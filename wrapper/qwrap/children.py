"""The one run-and-check path for every child: tools, workers, the calibration conversion, the
vocab-only tokenizer check, environment health checks and installs.

``run_checked`` runs a command under the supervisor with a log file that survives, turns its
progress lines into calls, and maps every way it can end badly to a qwrap error: stopped by
our own Ctrl-C/SIGTERM (Interrupted), a deadline or a stall (StalledError), the kernel's OOM
killer, or a failure the table in failures.py explains.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from . import supervisor
from .errors import Interrupted, StalledError
from .failures import error_for
from .supervisor import ProcessResult


class LineParser(Protocol):
    """A progress parser (progress.py): a line in, a progress value (done, total, unit) or None out."""

    def feed(self, line: str) -> Any: ...


ProgressCallback = Callable[[float, float | None, str], None]


def run_checked(
    argv: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    log_path: Path,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    parser: LineParser | None = None,
    on_progress: ProgressCallback | None = None,
    on_line: Callable[[str], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    on_start: Callable[[int, float], None] | None = None,
    use_pty: bool = False,
    stall_timeout: float | None = None,
    timeout: float | None = None,
    oom_extra: str = "",
) -> ProcessResult:
    """Run ``argv`` (described as ``what`` in messages) and return its result if it succeeded."""

    def lines(line: str) -> None:
        if on_line is not None:
            on_line(line)
        if parser is not None and on_progress is not None:
            p = parser.feed(line)
            if p is not None:
                on_progress(p.done, p.total, p.unit)

    result = supervisor.run(
        argv, env=env, cwd=cwd, log_path=log_path, on_line=lines, on_event=on_event, on_start=on_start,
        use_pty=use_pty, stall_timeout=stall_timeout, timeout=timeout,
    )
    if result.stopped_by_signal is not None:
        raise Interrupted(f"{what} stopped", signum=result.stopped_by_signal)
    if result.timed_out:
        raise StalledError(
            f"{what} did not finish within {timeout:.0f} s and was stopped",
            hint=f"Nothing was changed because of it. Look at {log_path}, then run the same command again.",
            log_path=str(log_path),
        )
    if not result.ok:
        raise error_for(result, what, oom_extra=oom_extra)
    return result
