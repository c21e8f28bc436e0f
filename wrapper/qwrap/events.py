"""``--events FILE|-``: NDJSON for log collectors, one object per event.

Schema ``qwrap.events/1``: every object has ``schema``, ``ts`` (unix seconds), ``run_id``,
``event`` and, for step events, ``step``. Events: ``run_started``, ``step_started``,
``step_progress`` (at most one per step per ``PROGRESS_INTERVAL_S``), ``step_finished``
(``state``: done|skipped|failed|interrupted, ``detail``), ``artifact_validated`` (``path``,
``info``), ``warning`` (``message``), ``run_finished`` (``exit_code``, ``error``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from .context import Reporter

SCHEMA = "qwrap.events/1"
PROGRESS_INTERVAL_S = 2.0


class EventStream:
    """A Reporter that writes events and forwards everything to an inner reporter."""

    def __init__(self, target: str, inner: Reporter, run_id: str | None = None):
        self.inner = inner
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._own = target != "-"
        self.stream: IO[str] = Path(target).open("a") if self._own else sys.stdout
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()  # steps report from their own threads: one whole line each

    def emit(self, event: str, **fields: Any) -> None:
        record = {"schema": SCHEMA, "ts": round(time.time(), 3), "run_id": self.run_id, "event": event, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()

    def close(self) -> None:
        if self._own:
            self.stream.close()

    # -- Reporter -------------------------------------------------------------
    def step_started(self, step_id: str, label: str) -> None:
        self.emit("step_started", step=step_id, label=label)
        self.inner.step_started(step_id, label)

    def step_progress(self, step_id: str, done: float, total: float | None, unit: str) -> None:
        now = time.monotonic()
        if now - self._last_progress.get(step_id, 0.0) >= PROGRESS_INTERVAL_S:
            self._last_progress[step_id] = now
            self.emit("step_progress", step=step_id, done=done, total=total, unit=unit)
        self.inner.step_progress(step_id, done, total, unit)

    def step_finished(self, step_id: str, state: str, detail: str) -> None:
        self.emit("step_finished", step=step_id, state=state, detail=detail)
        self.inner.step_finished(step_id, state, detail)

    def artifact_ready(self, step_id: str, path: str, info: dict[str, Any]) -> None:
        self.emit("artifact_validated", step=step_id, path=path, info=info)
        self.inner.artifact_ready(step_id, path, info)

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)
        self.inner.warning(message)
