"""Execute a plan as a DAG: skip what the journal proves done, run the rest - independent steps
at the same time, within a CPU budget - and record every outcome.

A step is skipped when its last record is ``done`` with the same fingerprint and its outputs
still have the recorded size and sha256 - or when nothing still needed consumes it (e.g. the
16-bit intermediate once every quant is validated). Needs are computed from the deliverables
backwards, so a rerun does exactly the missing work.

Concurrency: each running step has a thread that waits on its child processes (the children do
the work; the threads only supervise). The main thread schedules: a step starts when its
inputs are done and the cores it will use fit in ``--jobs``; a multi-threaded tool gets the free
cores shared among the multi-threaded steps ready at that moment, so several quantizations
share two cores instead of queueing. Steps nearest to a deliverable go first (the validation of
one type overlaps the quantization of the next), the longest first among equals. Ctrl-C/SIGTERM reach the main thread only: it
asks the supervisor to stop every child, waits for every step to record "interrupted", then
raises. A failure starts nothing new; steps already running finish and are kept.

``--step ID`` (``RunSettings.only``) runs exactly the named steps: the others must be done and
verified already (else InputsNotReadyError names them). Each step runs under its own lock
(locks.py), so other processes - on this machine or another sharing the folder - may run other
steps of the same plan at the same time; a step whose lock is held elsewhere is refused (exit 14).
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from . import outpaths, supervisor
from .context import InputOutputs, Reporter, StepContext, StepOutcome, place
from .errors import InputsNotReadyError, InsufficientDiskError, Interrupted, OutputExistsError, QwrapError, UsageError
from .formats import FORMATS
from .journal import ChildRecord, Journal, OutputEntry, StepRecord, describe_file, outputs_verified
from .locks import StepLock, host, step_running, whoami
from .plan import Plan, Step, StepState
from .units import human_bytes

WAIT_S = 0.2  # how often the scheduler wakes while steps run (signals, finished steps)


@dataclass(frozen=True)
class RunSettings:
    output: Path
    reporter: Reporter
    jobs: int = 0  # cores the run may keep busy; 0: the cores this process may use
    threads: int = 0  # threads per tool; 0: the runner shares the free cores
    stall_timeout: float | None = 600.0
    force: bool = False
    preflight: bool = True  # check free disk before starting
    only: tuple[str, ...] = ()  # --step: run exactly these steps (their inputs must be done)

    @property
    def budget(self) -> int:
        return self.jobs or usable_cores()


@dataclass(frozen=True)
class StepSummary:
    step: Step
    state: StepState
    record: StepRecord | None = None

    @property
    def facts(self) -> Mapping[str, Any]:
        return self.record.info if self.record else {}


def _worse(new: BaseException, old: BaseException) -> bool:
    """Which failure to report when several steps fail: an explained one (a QwrapError) over a
    bare exception, a real failure over the interruptions it caused."""
    if isinstance(old, Interrupted) and not isinstance(new, Interrupted):
        return True
    return not isinstance(old, QwrapError) and isinstance(new, QwrapError)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Stop:
    def __init__(self) -> None:
        self.signum: int | None = None


@contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    """Ctrl-C / SIGTERM: stop every running child, start nothing new (main thread only)."""
    stop = _Stop()

    def handler(signum: int, _frame: object) -> None:
        stop.signum = stop.signum or signum
        supervisor.request_stop(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        supervisor.clear_stop()


@dataclass
class _Running:
    step: Step
    cores: int
    thread: threading.Thread


class Runner:
    def __init__(self, plan: Plan, journal: Journal, settings: RunSettings):
        self.plan = plan
        self.journal = journal
        self.settings = settings
        self.output = settings.output
        self._verified: dict[str, bool] = {}
        self._by_id = plan.by_id()
        self._distance = self._distances()

    # -- deciding -------------------------------------------------------------
    def _done_ok(self, step: Step, states: Mapping[str, StepRecord]) -> bool:
        if step.id not in self._verified:
            self._verified[step.id] = self._proven(step, states.get(step.id))
        return self._verified[step.id]

    def _proven(self, step: Step, st: StepRecord | None) -> bool:
        return (st is not None and st.state is StepState.DONE and st.fingerprint == step.fingerprint
                and outputs_verified(st.outputs, self.output))

    def needed(self, states: Mapping[str, StepRecord]) -> set[str]:
        if self.settings.only:
            return self._needed_only(states)
        need: set[str] = set()
        for step in reversed(self.plan.steps):
            consumers = self.plan.consumers(step.id)
            wanted = step.deliverable or not consumers or any(c.id in need for c in consumers)
            if wanted and not self._done_ok(step, states):
                need.add(step.id)
        return need

    def _needed_only(self, states: Mapping[str, StepRecord]) -> set[str]:
        """--step: the named steps not proven done; every step they read must be proven done
        or named too."""
        only = self.settings.only
        unknown = [i for i in only if i not in self._by_id]
        if unknown:
            raise UsageError(f"--step {unknown[0]!r} is not a step of this plan",
                             hint=f"Its steps: {', '.join(s.id for s in self.plan.steps)} "
                             "(`qwrap plan` with the same options shows them).")
        need = {i for i in only if not self._done_ok(self._by_id[i], states) and self._wanted(self._by_id[i], states)}
        missing = [i for s in self.plan.steps if s.id in need for i in s.input_ids
                   if i not in only and not self._done_ok(self._by_id[i], states)]
        if missing:
            names = list(dict.fromkeys(missing))
            raise InputsNotReadyError(
                f"{', '.join(sorted(need))} read{'s' if len(need) == 1 else ''} {', '.join(names)}, "
                "not done and verified in this output folder yet",
                hint="Run " + " ".join(f"--step {i}" for i in names) + " first (same options), "
                "or the whole plan with `qwrap run` and the same options.")
        return need

    def _wanted(self, step: Step, states: Mapping[str, StepRecord]) -> bool:
        """--step: a step whose every reader is done has nothing left to give (e.g. a quantization
        whose partial file its validation renamed): running it again would only leave a stray file."""
        consumers = self.plan.consumers(step.id)
        return step.deliverable or not consumers or any(not self._done_ok(c, states) for c in consumers)

    def _distances(self) -> dict[str, int]:
        """Steps from each step to the nearest deliverable: the scheduler's priority."""
        dist: dict[str, int] = {}
        for step in reversed(self.plan.steps):
            below = [dist[c.id] + 1 for c in self.plan.consumers(step.id) if c.id in dist]
            dist[step.id] = 0 if step.deliverable else min(below, default=0)
        return dist

    def reap_orphans(self) -> None:
        """Steps left ``started`` by a qwrap that was SIGKILLed (their step lock is free): kill
        its children on this machine and close the steps. A step whose lock is held is running
        in another process, here or elsewhere: left alone."""
        for st in self.journal.states().values():
            if st.state is StepState.STARTED:
                lock = StepLock(self.output, st.step)
                if lock.try_acquire() is None:
                    try:
                        self._close_dead(st.step)
                    finally:
                        lock.release()

    def _close_dead(self, step_id: str) -> None:
        st = self.journal.states().get(step_id)  # again, under its lock: it may have finished meanwhile
        if st is None or st.state is not StepState.STARTED:
            return
        for child in self.journal.children():
            if child.step == step_id and child.host in (None, host()):
                supervisor.reap_orphans(child.pid, child.create_time)
        self.journal.record(StepRecord(step_id, StepState.INTERRUPTED, st.fingerprint, host=host(), by=whoami(),
                                       error="qwrap itself was killed mid-step"))

    # -- running --------------------------------------------------------------
    def run(self) -> list[StepSummary]:
        outpaths.check(self.output, [rel for s in self.plan.steps for rel in outpaths.written_by(s.outputs, s.scratch)])
        self.reap_orphans()
        states = self.journal.states()
        need = self.needed(states)
        self._refuse_overwrites(need)
        if self.settings.preflight:
            self._check_disk(need)
        summaries: dict[str, StepSummary] = {}
        for step in self.plan.steps:
            if step.id in need:
                continue
            if self.settings.only and step.id not in self.settings.only and not self._verified.get(step.id):
                summaries[step.id] = StepSummary(step, StepState.PENDING)  # another process's business
                continue
            summaries[step.id] = StepSummary(step, StepState.SKIPPED, states.get(step.id))
            if not self.settings.only or step.id in self.settings.only:
                self.settings.reporter.step_finished(step.id, "skipped", step.label)
        self._execute([s for s in self.plan.steps if s.id in need], summaries)
        return [summaries.get(s.id, StepSummary(s, StepState.PENDING)) for s in self.plan.steps]

    def _execute(self, pending: list[Step], summaries: dict[str, StepSummary]) -> None:
        results: queue.Queue[tuple[str, StepSummary | BaseException]] = queue.Queue()
        running: dict[str, _Running] = {}
        failure: BaseException | None = None
        with _stop_on_signals() as stop:
            while pending or running:
                if failure is None and stop.signum is None:
                    self._start_ready(pending, running, summaries, results)
                if not running:
                    break
                try:
                    step_id, result = results.get(timeout=WAIT_S)
                except queue.Empty:
                    continue
                running.pop(step_id).thread.join()
                if isinstance(result, StepSummary):
                    summaries[step_id] = result
                elif failure is None or _worse(result, failure):
                    failure = result
        if stop.signum is not None:
            raise Interrupted(signum=stop.signum)
        if failure is not None:
            raise failure
        if pending:  # cannot happen for a plan built in order; say so rather than stop quietly
            raise RuntimeError(f"steps never became ready: {[s.id for s in pending]}")

    def _start_ready(self, pending: list[Step], running: dict[str, _Running], summaries: dict[str, StepSummary],
                     results: queue.Queue[tuple[str, StepSummary | BaseException]]) -> None:
        available = {i for i, s in summaries.items() if s.record is not None and s.state is not StepState.PENDING}
        # nearest to a deliverable first; among equals the longest first (fewer idle cores at
        # the end of a batch), then plan order
        ready = sorted((s for s in pending if all(i in available for i in s.input_ids)),
                       key=lambda s: (self._distance[s.id], -(s.estimate.seconds or 0.0), self.plan.steps.index(s)))
        free = self.settings.budget - sum(r.cores for r in running.values())
        for step in ready:
            if running and (free < 1 or not self._memory_allows(step, running)):
                break
            if self._blocked(step, running):
                continue
            threads = self._threads_for(step, free, self._threaded_peers(ready, pending, running))
            cores = threads if step.threaded else 1
            inputs = self._inputs(step, summaries)
            thread = threading.Thread(target=self._thread, args=(step, threads, inputs, results),
                                      name=f"step {step.id}", daemon=True)
            running[step.id] = _Running(step, cores, thread)
            pending.remove(step)
            free -= cores
            thread.start()

    def _threaded_peers(self, ready: list[Step], pending: list[Step], running: dict[str, _Running]) -> list[Step]:
        """The multi-threaded steps that could start now (an exclusive group counts once)."""
        peers: list[Step] = []
        for s in ready:
            if s.threaded and s in pending and not self._blocked(s, running) and not (
                    s.exclusive and any(p.exclusive == s.exclusive for p in peers)):
                peers.append(s)
        return peers

    @staticmethod
    def _blocked(step: Step, running: dict[str, _Running]) -> bool:
        """A step of an exclusive group waits while another of its group runs."""
        return step.exclusive is not None and any(r.step.exclusive == step.exclusive for r in running.values())

    def _threads_for(self, step: Step, free: int, peers: list[Step]) -> int:
        """Free cores shared among the multi-threaded steps that could start now, in proportion
        to their estimated time (equal shares without estimates): two long quantizations get a
        core each, while a long one beside a short one gets both instead of running alone on
        one core once the short one is done."""
        if self.settings.threads:
            return self.settings.threads
        if not step.threaded:
            return 1
        times = [p.estimate.seconds for p in peers]
        if step not in peers or None in times or not sum(t or 0.0 for t in times):
            return max(1, free // max(1, len(peers)))
        share = free * (step.estimate.seconds or 0.0) / sum(t or 0.0 for t in times)
        return max(1, min(free, round(share)))

    def _memory_allows(self, step: Step, running: dict[str, _Running]) -> bool:
        """Start a step beside others only if all of their estimated peaks fit in free memory."""
        wanted = step.estimate.peak_ram_bytes + sum(r.step.estimate.peak_ram_bytes for r in running.values())
        return wanted <= psutil.virtual_memory().available

    def _inputs(self, step: Step, summaries: Mapping[str, StepSummary]) -> dict[str, InputOutputs]:
        return {role: InputOutputs(tuple(self.output / rel for rel in self._by_id[i].outputs), summaries[i].facts)
                for role, i in step.inputs}

    def _thread(self, step: Step, threads: int, inputs: dict[str, InputOutputs],
                results: queue.Queue[tuple[str, StepSummary | BaseException]]) -> None:
        lock = StepLock(self.output, step.id)
        try:
            lock.acquire()
            results.put((step.id, self._already_done(step) or self._run_step(step, threads, inputs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            results.put((step.id, exc))
        finally:
            lock.release()

    def _already_done(self, step: Step) -> StepSummary | None:
        """Another process may have finished the step since this run read the journal."""
        if not self.settings.only:
            return None  # a whole-plan run holds the folder alone
        st = self.journal.states().get(step.id)
        if not self._proven(step, st):
            return None
        self.settings.reporter.step_finished(step.id, "skipped", step.label)
        return StepSummary(step, StepState.SKIPPED, st)

    def _refuse_overwrites(self, need: set[str]) -> None:
        if self.settings.force:
            return
        for step in self.plan.steps:
            if step.deliverable and step.id in need and not self._started_elsewhere(step):
                for rel in step.outputs:
                    if (self.output / rel).exists():
                        raise OutputExistsError(
                            f"{self.output / rel} already exists and this run did not make it",
                            hint="Pass --force to overwrite it, or choose another --output.",
                        )

    def _started_elsewhere(self, step: Step) -> bool:
        """--step: a deliverable that another process is making right now is refused by its
        lock (exit 14), not as an existing output (exit 8)."""
        return bool(self.settings.only) and step_running(self.output, step.id)

    def _check_disk(self, need: set[str]) -> None:
        wanted = sum(s.estimate.peak_disk_bytes for s in self.plan.steps if s.id in need)
        free = shutil.disk_usage(self.output).free
        if wanted > free:
            raise InsufficientDiskError(
                f"{self.output} has {human_bytes(free)} free; this run needs about {human_bytes(wanted)} there",
                hint="Free space or choose another --output; --no-preflight skips this check.",
            )

    def _disk_short(self, step: Step) -> bool:
        """Tools do not always say ENOSPC (llama-quantize: 'iostream error'): a failed step
        with less free space left than its output needs is reported as a full disk."""
        return shutil.disk_usage(self.output).free < step.estimate.output_bytes

    def _disk_error(self, step: Step, cause: QwrapError) -> InsufficientDiskError:
        where = self.output / step.outputs[0] if step.outputs else self.output
        return InsufficientDiskError(
            f"the disk filled up writing {where}: about {human_bytes(step.estimate.output_bytes)} needed, "
            f"{human_bytes(shutil.disk_usage(self.output).free)} free",
            hint="Free space (or choose another --output) and run the same command again: "
            "finished steps are kept." + (f" Tool log: {cause.log_path}" if cause.log_path else ""),
            log_path=cause.log_path,
        )

    def _on_child(self, step: Step) -> Callable[[int, float], None]:
        def record(pid: int, create_time: float) -> None:
            self.journal.child(ChildRecord(step.id, pid, create_time, host()))

        return record

    def _run_step(self, step: Step, threads: int, inputs: dict[str, InputOutputs]) -> StepSummary:
        s = self.settings
        s.reporter.step_started(step.id, step.label)
        self.journal.record(StepRecord(step.id, StepState.STARTED, step.fingerprint, host=host(), by=whoami()))
        ctx = StepContext(step.id, self.output, s.reporter, threads, s.stall_timeout, s.force, self._on_child(step))
        started = time.monotonic()
        try:
            outcome = FORMATS[step.format].execute(step, inputs, ctx)
        except Interrupted as exc:
            self._record_failure(step, StepState.INTERRUPTED, exc, started)
            raise
        except QwrapError as exc:
            if isinstance(exc, InsufficientDiskError) or self._disk_short(step):
                exc = self._disk_error(step, exc)
            self._record_failure(step, StepState.FAILED, exc, started)
            raise exc from None
        except OSError as exc:  # qwrap's own writes (a log, a header read) on a full disk
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and not self._disk_short(step):
                self._record_failure(step, StepState.FAILED, exc, started)
                raise
            error = self._disk_error(step, QwrapError(str(exc)))
            self._record_failure(step, StepState.FAILED, error, started)
            raise error from None
        except BaseException as exc:
            self._record_failure(step, StepState.FAILED, exc, started)
            raise
        return self._record_done(step, outcome, started)

    def _record_done(self, step: Step, outcome: StepOutcome, started: float) -> StepSummary:
        outputs: list[OutputEntry] = [describe_file(p, self.output) for p in outcome.outputs]
        for partial, final in outcome.renames:
            outputs.append({**describe_file(partial, self.output), "path": os.path.relpath(final, self.output)})
        record = StepRecord(step.id, StepState.DONE, step.fingerprint, tuple(outputs), dict(outcome.facts),
                            round(time.monotonic() - started, 3), outcome.peak_rss_bytes, outcome.peak_gpu_bytes,
                            host=host(), by=whoami())
        self.journal.record(record)
        for partial, final in outcome.renames:
            place(partial, final)
        reporter = self.settings.reporter
        reporter.step_finished(step.id, "done", step.label)
        if step.deliverable:
            for out in outputs:
                reporter.artifact_ready(step.id, str(self.output / out["path"]), dict(outcome.facts))
        return StepSummary(step, StepState.DONE, record)

    def _record_failure(self, step: Step, state: StepState, exc: BaseException, started: float) -> None:
        for rel in step.outputs:  # never leave a half-written file under a tracked name
            path = self.output / rel
            if path.name.endswith(".partial") and path.is_file():
                path.unlink()
        log = exc.log_path if isinstance(exc, QwrapError) else None
        self.journal.record(StepRecord(step.id, state, step.fingerprint, error=str(exc) or type(exc).__name__,
                                       error_type=type(exc).__name__, log=log, host=host(), by=whoami(),
                                       seconds=round(time.monotonic() - started, 3)))
        self.settings.reporter.step_finished(step.id, state.value, str(exc))


def remove_intermediates(plan: Plan, output: Path) -> list[Path]:
    """After a successful run, delete what only a resume needed: outputs of steps that are not
    deliverables under ``.checkpoint/work/`` (the 16-bit GGUF, the imatrix) and every step's
    scratch folders (AWQ/GPTQ per-layer checkpoints, as large as the model)."""
    removed: list[Path] = []
    for step in plan.steps:
        for rel in step.scratch:
            folder = output / rel
            if folder.is_dir():
                shutil.rmtree(folder)
                removed.append(folder)
            if folder.parent != output and folder.parent.is_dir() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()  # e.g. .checkpoint/layers once its last step's folder is gone
        if step.deliverable:
            continue
        for rel in step.outputs:
            path = output / rel
            if rel.startswith(".checkpoint/work/") and path.is_file():
                path.unlink()
                removed.append(path)
    return removed
