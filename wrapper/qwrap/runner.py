"""Execute a plan: skip what the journal proves done, run the rest, record every outcome.

A step is skipped when its last record is ``done`` with the same fingerprint and its
outputs still have the recorded size and sha256 - or when nothing still needed consumes
it (e.g. the 16-bit intermediate once every quant is validated). Needs are computed
from the deliverables backwards, so a rerun does exactly the missing work.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import supervisor
from .context import RunContext, StepOutcome, place
from .errors import InsufficientDiskError, Interrupted, OutputExistsError, QwrapError
from .formats import FORMATS
from .hub import ModelSource
from .journal import Journal, StepState, describe_file, outputs_verified
from .plan import Plan, Step
from .request import Request
from .units import human_bytes


@dataclass
class StepSummary:
    step: Step
    state: str  # done | skipped | failed | interrupted | pending
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOutcome:
    request: Request
    source: ModelSource
    plan: Plan
    summaries: list[StepSummary]
    warnings: list[str]


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Between children, Ctrl-C / SIGTERM raise Interrupted so the journal gets a record."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum=signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Runner:
    def __init__(self, ctx: RunContext, journal: Journal):
        self.ctx = ctx
        self.journal = journal
        self.plan: Plan = ctx.plan
        self._verified: dict[str, bool] = {}

    # -- deciding -------------------------------------------------------------
    def _done_ok(self, step: Step, states: dict[str, StepState]) -> bool:
        if step.id not in self._verified:
            st = states.get(step.id)
            self._verified[step.id] = (
                st is not None
                and st.state == "done"
                and st.fingerprint == step.fingerprint
                and outputs_verified(st.record.get("outputs", []), self.ctx.output)
            )
        return self._verified[step.id]

    def needed(self, states: dict[str, StepState]) -> set[str]:
        need: set[str] = set()
        for step in reversed(self.plan.steps):
            consumers = self.plan.consumers(step.id)
            wanted = step.deliverable or not consumers or any(c.id in need for c in consumers)
            if wanted and not self._done_ok(step, states):
                need.add(step.id)
        return need

    def reap_orphans(self) -> None:
        """Children of a qwrap that was SIGKILLed: kill them, and close their steps."""
        states = self.journal.states()
        for rec in self.journal.records():
            if rec.get("kind") != "child":
                continue
            st = states.get(rec["step_ref"])
            if st is not None and st.state == "started":
                supervisor.reap_orphans(int(rec["pid"]), float(rec["create_time"]))
        for st in states.values():
            if st.state == "started":
                self.journal.step_record(
                    st.step, "interrupted", st.fingerprint, error="qwrap itself was killed mid-step"
                )

    # -- running --------------------------------------------------------------
    def run(self) -> list[StepSummary]:
        self.reap_orphans()
        states = self.journal.states()
        need = self.needed(states)
        self._refuse_overwrites(need)
        if self.ctx.request.preflight:
            self._check_disk(need)
        summaries = []
        with _signals_raise():
            for step in self.plan.steps:
                if step.id not in need:
                    st = states.get(step.id)
                    if st is not None:
                        self.ctx.facts[step.id] = st.record.get("info", {})
                    summaries.append(StepSummary(step, "skipped", st.record if st else {}))
                    self.ctx.reporter.step_finished(step.id, "skipped", step.label)
                    continue
                summaries.append(self._run_step(step))
        return summaries

    def _refuse_overwrites(self, need: set[str]) -> None:
        if self.ctx.request.force:
            return
        for step in self.plan.steps:
            if step.deliverable and step.id in need:
                for rel in step.outputs:
                    if (self.ctx.output / rel).exists():
                        raise OutputExistsError(
                            f"{self.ctx.output / rel} already exists and this run did not make it",
                            hint="Pass --force to overwrite it, or choose another --output.",
                        )

    def _estimate(self, step: Step) -> int:
        return FORMATS[step.format].estimate_bytes(step, self.ctx.parameters)

    def _check_disk(self, need: set[str]) -> None:
        wanted = sum(self._estimate(s) for s in self.plan.steps if s.id in need)
        free = shutil.disk_usage(self.ctx.output).free
        if wanted > free:
            raise InsufficientDiskError(
                f"{self.ctx.output} has {human_bytes(free)} free; this run needs about "
                f"{human_bytes(wanted)} there",
                hint="Free space or choose another --output; --no-preflight skips this check.",
            )

    def _disk_short(self, step: Step) -> bool:
        """Tools do not always say ENOSPC (llama-quantize: 'iostream error'): a failed step
        with less free space left than its output needs is reported as a full disk."""
        return shutil.disk_usage(self.ctx.output).free < self._estimate(step)

    def _disk_error(self, step: Step, cause: QwrapError) -> InsufficientDiskError:
        where = self.ctx.output / step.outputs[0] if step.outputs else self.ctx.output
        return InsufficientDiskError(
            f"the disk filled up writing {where}: about {human_bytes(self._estimate(step))} needed, "
            f"{human_bytes(shutil.disk_usage(self.ctx.output).free)} free",
            hint="Free space (or choose another --output) and run the same command again: "
            "finished steps are kept." + (f" Tool log: {cause.log_path}" if cause.log_path else ""),
            log_path=cause.log_path,
        )

    def _on_child(self, step: Step) -> Any:
        def record(pid: int, create_time: float) -> None:
            self.journal.append(
                {"kind": "child", "step_ref": step.id, "pid": pid, "create_time": create_time}
            )

        return record

    def _run_step(self, step: Step) -> StepSummary:
        self.ctx.reporter.step_started(step.id, step.label)
        self.journal.step_record(step.id, "started", step.fingerprint)
        self.ctx.on_child_start = self._on_child(step)
        started = time.monotonic()
        try:
            outcome = FORMATS[step.format].execute(step, self.ctx)
        except Interrupted as exc:
            self._record_failure(step, "interrupted", exc, started)
            raise
        except QwrapError as exc:
            if isinstance(exc, InsufficientDiskError) or self._disk_short(step):
                exc = self._disk_error(step, exc)
            self._record_failure(step, "failed", exc, started)
            raise exc from None
        except KeyboardInterrupt:
            interrupted = Interrupted(signum=signal.SIGINT)
            self._record_failure(step, "interrupted", interrupted, started)
            raise interrupted from None
        except BaseException as exc:
            self._record_failure(step, "failed", exc, started)
            raise
        return self._record_done(step, outcome, started)

    def _record_done(self, step: Step, outcome: StepOutcome, started: float) -> StepSummary:
        seconds = round(time.monotonic() - started, 3)
        outputs = [describe_file(p, self.ctx.output) for p in outcome.outputs]
        for partial, final in outcome.renames:
            outputs.append({**describe_file(partial, self.ctx.output), "path": os.path.relpath(final, self.ctx.output)})
        record = {
            "outputs": outputs,
            "info": outcome.info,
            "seconds": seconds,
            "peak_rss_bytes": outcome.peak_rss_bytes,
            "peak_gpu_bytes": outcome.peak_gpu_bytes,
        }
        self.journal.step_record(step.id, "done", step.fingerprint, **record)
        for partial, final in outcome.renames:
            place(partial, final)
        self.ctx.facts[step.id] = outcome.info
        self.ctx.reporter.step_finished(step.id, "done", step.label)
        if step.deliverable:
            for out in outputs:
                self.ctx.reporter.artifact_ready(step.id, str(self.ctx.output / out["path"]), outcome.info)
        return StepSummary(step, "done", record)

    def _record_failure(self, step: Step, state: str, exc: BaseException, started: float) -> None:
        for rel in step.outputs:  # never leave a half-written file under a tracked name
            path = self.ctx.output / rel
            if path.name.endswith(".partial") and path.is_file():
                path.unlink()
        error = {
            "error": str(exc) or type(exc).__name__,
            "error_type": type(exc).__name__,
            "seconds": round(time.monotonic() - started, 3),
        }
        if isinstance(exc, QwrapError) and exc.log_path:
            error["log"] = exc.log_path
        self.journal.step_record(step.id, state, step.fingerprint, **error)
        self.ctx.reporter.step_finished(step.id, state, str(exc))


def remove_intermediates(ctx: RunContext) -> list[Path]:
    """After a successful run, delete what only a resume needed: the 16-bit GGUF, the
    imatrix, and AWQ/GPTQ per-layer checkpoints (as large as the model)."""
    removed: list[Path] = []
    if ctx.request.keep_intermediate:
        return removed
    layers = ctx.checkpoint / "layers"
    if layers.is_dir():
        shutil.rmtree(layers)
        removed.append(layers)
    for step in ctx.plan.steps:
        if step.deliverable:
            continue
        for rel in step.outputs:
            path = ctx.output / rel
            if rel.startswith(".checkpoint/work/") and path.is_file():
                path.unlink()
                removed.append(path)
    return removed
