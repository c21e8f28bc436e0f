"""The parent side of the worker protocol (workers/protocol.py), for every format that runs a
worker (AWQ/GPTQ's quantize and validate steps, GGUF's weights view): write the job, run its
worker in its backend's environment as a child of the step (``StepContext.run_tool``, which is
``children.run_checked``), read its JSON-line events into progress and warnings, and turn its
error event into the matching qwrap error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .context import StepContext
from .envs import find_env, worker_code
from .errors import (
    BackendUnavailableError,
    Interrupted,
    OutOfMemoryError,
    QwrapError,
    StepFailedError,
    UnsupportedModelError,
    UsageError,
    ValidationFailedError,
)
from .workers.protocol import Job, ProtocolError, parse_event, worker_module, write_job

# One worker at a time: each holds the model (and the GPU, when there is one), and two on one
# GPU would run it out of memory; the llama.cpp steps still run beside them.
EXCLUSIVE = "hf-worker"
# The source model's log-probs on the run's evaluation chunks, computed once per run by the
# first worker that measures an artifact on them and reused by the others.
REFERENCE_DIR = ".checkpoint/work/hf-reference"

ERROR_CLASSES: dict[str, type[QwrapError]] = {
    "oom": OutOfMemoryError,
    "backend_unavailable": BackendUnavailableError,
    "unsupported": UnsupportedModelError,
    "bad_job": UsageError,
    "validation": ValidationFailedError,
}  # any other error kind: StepFailedError


@dataclass
class Events:
    """What a worker said, collected while it runs."""

    ctx: StepContext
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        try:
            event = parse_event(line)
        except ProtocolError as exc:
            self.ctx.warning(f"ignored a malformed worker event ({exc})")
            return
        kind = event["event"]
        if kind == "layer_done":
            self.layers.append(event)
            self.ctx.progress(event["index"] + 1, event["total"], "layers")
        elif kind == "progress":
            self.ctx.progress(event["done"], event["total"], event["unit"])
        elif kind == "warning":
            # Libraries' warnings can be pages long (autoawq's deprecation notice): one line
            # on screen, the whole text is in the step log.
            lines = [line.strip() for line in str(event["message"]).splitlines() if line.strip()]
            more = " (more in the step log)" if len(lines) > 1 else ""
            self.ctx.warning(f"{lines[0] if lines else ''}{more}")
        elif kind == "result":
            self.result = event
        elif kind == "error":
            self.error = event


def worker_env(threads: int) -> dict[str, str | None]:
    """The variables a worker gets besides the parent's: only qwrap's worker code on its path."""
    return {
        "PYTHONPATH": str(worker_code()),
        "PYTHONUNBUFFERED": "1",
        # gptqmodel sizes its CPU worker pools from this and needs at least 2
        "GPTQMODEL_CPU_WORKERS": str(max(2, os.cpu_count() or 1)),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_worker(ctx: StepContext, job: Job, env_name: str, what: str,
               threads: int | None = None) -> tuple[Events, int]:
    """Run a worker job in the environment ``env_name``: its events to progress and warnings,
    its error event to the matching qwrap error; returns its events (the result among them)
    and its peak memory. ``threads``: torch's thread count (default: the cores the runner gave
    the step)."""
    python = find_env(env_name).python
    jobs = ctx.checkpoint / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job_file = write_job(job, jobs / f"{ctx.step_id.replace(':', '-')}.json")
    events = Events(ctx)
    argv: list[str | os.PathLike[str]] = [python, "-m", worker_module(job), job_file]
    # cwd: libraries that drop log files into the working directory (gptqmodel) do it there
    cwd = ctx.checkpoint / "logs" / "libraries"
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        result = ctx.run_tool(argv, what=what, env=worker_env(threads or ctx.threads), on_event=events, cwd=cwd)
    except Interrupted:
        raise
    except QwrapError as exc:
        raise (error_from_event(events.error, what, exc.log_path) if events.error else exc) from None
    if events.error:
        raise error_from_event(events.error, what, str(result.log_path))
    if events.result is None:
        raise StepFailedError(f"{what} exited without a result", hint=f"See {result.log_path}.")
    return events, result.peak_rss_bytes


def error_from_event(error: dict[str, Any], what: str, log: str | None) -> QwrapError:
    """A worker's error event as the qwrap error of its kind, its log named in the hint."""
    cls = ERROR_CLASSES.get(error["kind"], StepFailedError)
    hint = (error.get("hint") or "") + (f" Log: {log}" if log else "")
    return cls(f"{what}: {error['message']}", hint=hint.strip() or None, log_path=log)
