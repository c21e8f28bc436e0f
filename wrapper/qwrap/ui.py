"""Live progress: rich bars with ETA on a terminal, plain periodic lines otherwise (CI logs).

Both write to stderr so that ``--json`` output on stdout stays one clean document.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_INTERVAL_S = 5.0


class RichReporter:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step_started(self, step_id: str, label: str) -> None:
        self.tasks[step_id] = self.progress.add_task(label, total=None)

    def step_progress(self, step_id: str, done: float, total: float | None, unit: str) -> None:
        task = self.tasks.get(step_id)
        if task is not None:
            self.progress.update(task, completed=done, total=total)

    def step_finished(self, step_id: str, state: str, detail: str) -> None:
        task = self.tasks.get(step_id)
        if state == "skipped":
            self.console.print(f"[dim]= {detail}: already done, reused[/dim]")
            return
        if task is not None:
            t = self.progress.tasks[task]
            self.progress.update(task, total=t.total or 1, completed=t.total or 1)
            mark = {"done": "[green]✓[/green]", "failed": "[red]✗[/red]"}.get(state, "[yellow]![/yellow]")
            self.progress.update(task, description=f"{mark} {t.description}")

    def artifact_ready(self, step_id: str, path: str, info: dict[str, Any]) -> None:
        pass

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}")


class PlainReporter:
    """One line per step start/end, progress at most every few seconds."""

    def __init__(self, stream: IO[str] | None = None, interval: float = PLAIN_INTERVAL_S):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.last: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}\n"
        with self._lock:  # steps report from their own threads: one whole line each
            self.stream.write(line)
            self.stream.flush()

    def __enter__(self) -> PlainReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def step_started(self, step_id: str, label: str) -> None:
        self.started[step_id] = self.last[step_id] = time.monotonic()
        self._print(f"start  {step_id}: {label}")

    def step_progress(self, step_id: str, done: float, total: float | None, unit: str) -> None:
        now = time.monotonic()
        if now - self.last.get(step_id, 0.0) < self.interval:
            return
        self.last[step_id] = now
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        of = f"/{total:.0f}" if total else ""
        self._print(f"       {step_id}: {done:.0f}{of} {unit}{pct}")

    def step_finished(self, step_id: str, state: str, detail: str) -> None:
        secs = time.monotonic() - self.started.get(step_id, time.monotonic())
        extra = f" in {secs:.1f}s" if state != "skipped" else ""
        self._print(f"{state:<6} {step_id}{extra}" + (f": {detail}" if state != "done" else ""))

    def artifact_ready(self, step_id: str, path: str, info: dict[str, Any]) -> None:
        self._print(f"ready  {path}")

    def warning(self, message: str) -> None:
        self._print(f"warning: {message}")
