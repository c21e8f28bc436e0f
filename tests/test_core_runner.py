"""The runner's decisions, in-process: the real Runner, a real Journal and real files in
tmp_path, driving a test format whose actions are plain Python (registered in FORMATS the way
the runner dispatches: by ``step.format``). No tools, no environments, no subprocesses."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qwrap.context import Inputs, StepContext, StepOutcome
from qwrap.errors import (
    InputsNotReadyError,
    InsufficientDiskError,
    LockedError,
    OutputExistsError,
    StepFailedError,
    UsageError,
)
from qwrap.formats import FORMATS
from qwrap.journal import Journal
from qwrap.locks import StepLock, step_running
from qwrap.plan import Estimate, Plan, PlanBuilder, Step, StepState
from qwrap.runner import Runner, RunSettings, StepSummary, remove_intermediates

FMT = "core-test"
WORK = ".checkpoint/work"


class Recorder:
    """A Reporter that remembers what it was told (called from the step threads)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _add(self, what: str, step_id: str) -> None:
        with self._lock:
            self.events.append((what, step_id))

    def step_started(self, step_id: str, label: str) -> None:
        self._add("started", step_id)

    def step_progress(self, step_id: str, done: float, total: float | None, unit: str) -> None:
        pass

    def step_finished(self, step_id: str, state: str, detail: str) -> None:
        self._add(state, step_id)

    def artifact_ready(self, step_id: str, path: str, info: dict[str, object]) -> None:
        self._add("artifact", step_id)

    def warning(self, message: str) -> None:
        pass

    def said(self, what: str) -> list[str]:
        return [s for w, s in self.events if w == what]


class Actions:
    """The test format's ``execute``: writes ``text`` param + its inputs' contents to its first
    output (``core.write``), or renames its ``artifact`` input into place (``core.place``).
    Per-step behaviour: ``fail`` (after writing), ``before`` hooks; ``quorum``: the first
    actions wait (up to 5 s) until that many run at once, so a test sees every step the runner
    was willing to start together, whatever the machine's speed. It records the order of calls,
    the threads each got and which ran at once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threads: dict[str, int] = {}
        self.fail: set[str] = set()
        self.before: dict[str, Callable[[], None]] = {}
        self.quorum = 0
        self.active: set[str] = set()
        self.together: list[frozenset[str]] = []  # the set running each time one started
        self._lock = threading.Condition()
        self._open = threading.Event()  # once the quorum was reached, nobody waits any more

    @property
    def peak(self) -> int:
        return max((len(s) for s in self.together), default=0)

    def execute(self, step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
        with self._lock:
            self.calls.append(step.id)
            self.threads[step.id] = ctx.threads
            self.active.add(step.id)
            self.together.append(frozenset(self.active))
            if len(self.active) >= self.quorum:
                self._open.set()
                self._lock.notify_all()
            else:
                self._lock.wait_for(self._open.is_set, timeout=5)
        try:
            if step.id in self.before:
                self.before[step.id]()
            time.sleep(0.02 if self.quorum else 0)  # the others started with it may still enter
            if step.kind == "core.place":
                partial, final = inputs["artifact"].path, ctx.path(step.outputs[0])
                ctx.check_final(final)
                return StepOutcome((), {"placed": True}, renames=((partial, final),))
            text = str(step.param("text", "")) + "".join(inputs[r].path.read_text() for r in sorted(inputs))
            out = ctx.path(step.outputs[0])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            if step.id in self.fail:
                raise StepFailedError(f"{step.id} broke")
            return StepOutcome((out,), {"text": text})
        finally:
            with self._lock:
                self.active.discard(step.id)


@pytest.fixture
def actions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Actions]:
    a = Actions()
    monkeypatch.setitem(FORMATS, FMT, a)  # the runner needs only its execute()
    yield a


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def diamond(*, a_text: str = "A", b_text: str = "B") -> Plan:
    """a (an intermediate) read by two deliverables b and c."""
    pb = PlanBuilder("source-fp", "pin")
    pb.add("a", "core.write", FMT, "a", outputs=(f"{WORK}/a.txt",), params={"text": a_text})
    pb.add("b", "core.write", FMT, "b", inputs={"src": "a"}, outputs=("b.txt",), params={"text": b_text},
           deliverable=True)
    pb.add("c", "core.write", FMT, "c", inputs={"src": "a"}, outputs=("c.txt",), params={"text": "C"},
           deliverable=True)
    return pb.plan()


def runner(plan: Plan, out: Path, reporter: Recorder | None = None, **settings: object) -> Runner:
    return Runner(plan, Journal(out), RunSettings(out, reporter or Recorder(), **settings))  # type: ignore[arg-type]


def states(summaries: list[StepSummary]) -> dict[str, StepState]:
    return {s.step.id: s.state for s in summaries}


def history(out: Path, step_id: str) -> list[str]:
    return [r["state"] for r in Journal(out).history(step_id)]


# -- what is needed, what is skipped ----------------------------------------------------------


def test_a_first_run_runs_every_step_inputs_first_and_journals_them_done(actions: Actions, out: Path) -> None:
    rec = Recorder()
    result = runner(diamond(), out, rec).run()
    assert states(result) == {"a": StepState.DONE, "b": StepState.DONE, "c": StepState.DONE}
    assert actions.calls[0] == "a" and sorted(actions.calls[1:]) == ["b", "c"]
    assert (out / "b.txt").read_text() == "BA" and (out / "c.txt").read_text() == "CA"
    done = Journal(out).states()
    assert {i: r.state for i, r in done.items()} == {"a": StepState.DONE, "b": StepState.DONE, "c": StepState.DONE}
    assert done["b"].fingerprint == diamond().by_id()["b"].fingerprint
    assert done["b"].info == {"text": "BA"}
    assert done["b"].outputs[0]["path"] == "b.txt" and "sha256" in done["b"].outputs[0]
    assert "mtime_ns" in done["a"].outputs[0]  # an intermediate is pinned by size + mtime
    assert sorted(rec.said("artifact")) == ["b", "c"]  # deliverables only


def test_a_second_run_skips_every_step_proven_done(actions: Actions, out: Path) -> None:
    runner(diamond(), out).run()
    actions.calls.clear()
    rec = Recorder()
    r = runner(diamond(), out, rec)
    assert r.needed(Journal(out).states()) == set()
    result = r.run()
    assert actions.calls == []
    assert set(states(result).values()) == {StepState.SKIPPED}
    assert sorted(rec.said("skipped")) == ["a", "b", "c"]
    assert history(out, "b") == ["started", "done"]  # nothing new journaled


def test_a_deliverable_whose_bytes_changed_is_needed_again(actions: Actions, out: Path) -> None:
    runner(diamond(), out).run()
    (out / "b.txt").write_text("XY")  # same size, other bytes: only the sha256 tells
    assert runner(diamond(), out).needed(Journal(out).states()) == {"b"}
    with pytest.raises(OutputExistsError) as exc:  # a file this run did not make is not overwritten
        runner(diamond(), out).run()
    assert exc.value.exit_code == 8 and "b.txt" in str(exc.value)
    actions.calls.clear()
    result = runner(diamond(), out, force=True).run()
    assert actions.calls == ["b"]
    assert states(result) == {"a": StepState.SKIPPED, "b": StepState.DONE, "c": StepState.SKIPPED}
    assert (out / "b.txt").read_text() == "BA"


def test_a_missing_deliverable_reruns_it_and_the_intermediate_it_reads_if_that_is_gone(actions: Actions,
                                                                                       out: Path) -> None:
    runner(diamond(), out).run()
    (out / "c.txt").unlink()
    assert runner(diamond(), out).needed(Journal(out).states()) == {"c"}  # a still verifies
    (out / WORK / "a.txt").unlink()
    assert runner(diamond(), out).needed(Journal(out).states()) == {"a", "c"}
    actions.calls.clear()
    runner(diamond(), out).run()
    assert actions.calls == ["a", "c"]


def test_an_intermediate_nothing_needed_reads_is_not_remade(actions: Actions, out: Path) -> None:
    runner(diamond(), out).run()
    (out / WORK / "a.txt").unlink()  # as remove_intermediates leaves it
    assert runner(diamond(), out).needed(Journal(out).states()) == set()
    os.utime(out / "b.txt")  # a deliverable is verified by content, not by its mtime
    assert runner(diamond(), out).needed(Journal(out).states()) == set()


def test_an_intermediate_touched_since_it_was_made_is_not_trusted(actions: Actions, out: Path) -> None:
    runner(diamond(), out).run()
    (out / "b.txt").unlink()
    st = (out / WORK / "a.txt").stat()
    os.utime(out / WORK / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert runner(diamond(), out).needed(Journal(out).states()) == {"a", "b"}


def test_a_changed_fingerprint_makes_the_step_and_its_readers_needed(actions: Actions, out: Path) -> None:
    runner(diamond(), out).run()
    states_now = Journal(out).states()
    assert runner(diamond(b_text="B2"), out).needed(states_now) == {"b"}
    assert runner(diamond(a_text="A2"), out).needed(states_now) == {"a", "b", "c"}
    actions.calls.clear()
    runner(diamond(a_text="A2"), out, force=True).run()
    assert actions.calls[0] == "a" and sorted(actions.calls) == ["a", "b", "c"]
    assert (out / "c.txt").read_text() == "CA2"


def test_a_failed_or_interrupted_last_record_is_not_done(actions: Actions, out: Path) -> None:
    from qwrap.journal import StepRecord

    runner(diamond(), out).run()
    fp = diamond().by_id()["c"].fingerprint
    Journal(out).record(StepRecord("c", StepState.FAILED, fp, error="boom"))
    assert runner(diamond(), out).needed(Journal(out).states()) == {"c"}
    Journal(out).record(StepRecord("c", StepState.INTERRUPTED, fp))
    assert runner(diamond(), out).needed(Journal(out).states()) == {"c"}


# -- renames, failures, concurrency -------------------------------------------------------------


def two_stage(pb: PlanBuilder | None = None, *, name: str = "x") -> Plan:
    """An artifact written under ``.partial`` and renamed into place by its validation."""
    pb = pb or PlanBuilder("source-fp", "pin")
    w = pb.add(f"{name}.write", "core.write", FMT, "write", outputs=(f"{name}.bin.partial",), params={"text": name})
    pb.add(f"{name}.place", "core.place", FMT, "place", inputs={"artifact": w.id}, outputs=(f"{name}.bin",),
           deliverable=True)
    return pb.plan()


def test_a_rename_is_journaled_under_the_final_name_and_then_made(actions: Actions, out: Path) -> None:
    runner(two_stage(), out).run()
    assert (out / "x.bin").read_text() == "x" and not (out / "x.bin.partial").exists()
    placed = Journal(out).states()["x.place"]
    assert [o["path"] for o in placed.outputs] == ["x.bin"] and placed.outputs[0]["bytes"] == 1
    actions.calls.clear()
    # the write step's output is gone (renamed), but the deliverable that read it is proven done
    assert runner(two_stage(), out).needed(Journal(out).states()) == set()
    runner(two_stage(), out).run()
    assert actions.calls == []


def test_a_failure_is_journaled_and_its_partial_output_removed(actions: Actions, out: Path) -> None:
    actions.fail.add("x.write")
    with pytest.raises(StepFailedError, match="x.write broke"):
        runner(two_stage(), out).run()
    assert not (out / "x.bin.partial").exists()
    failed = Journal(out).states()["x.write"]
    assert failed.state is StepState.FAILED and failed.error_type == "StepFailedError"
    assert "x.place" not in Journal(out).states()  # its input never became done
    actions.fail.clear()
    actions.calls.clear()
    runner(two_stage(), out).run()  # the same command again finishes it
    assert actions.calls == ["x.write", "x.place"]


def test_a_failure_starts_nothing_new_while_running_steps_finish(actions: Actions, out: Path) -> None:
    """y fails while x runs: x finishes and is kept; z, which reads x, never starts."""
    pb = PlanBuilder("source-fp", "pin")
    pb.add("x", "core.write", FMT, "x", outputs=("x.txt",), params={"text": "x"})
    pb.add("y", "core.write", FMT, "y", outputs=("y.txt",), params={"text": "y"}, deliverable=True)
    pb.add("z", "core.write", FMT, "z", inputs={"src": "x"}, outputs=("z.txt",), deliverable=True)
    actions.fail.add("y")

    def until_y_has_failed() -> None:  # y's result is handed over before its step lock is freed
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = Journal(out).states().get("y")
            if st is not None and st.state is StepState.FAILED and not step_running(out, "y"):
                return
            time.sleep(0.01)
        raise AssertionError("y never failed")

    actions.before["x"] = until_y_has_failed
    with pytest.raises(StepFailedError, match="y broke"):
        runner(pb.plan(), out, jobs=2).run()
    assert sorted(actions.calls) == ["x", "y"]
    journaled = Journal(out).states()
    assert journaled["x"].state is StepState.DONE and (out / "x.txt").read_text() == "x"
    assert journaled["y"].state is StepState.FAILED
    assert "z" not in journaled


def independent(n: int, **step: object) -> Plan:
    pb = PlanBuilder("source-fp", "pin")
    for i in range(n):
        pb.add(f"s{i}", "core.write", FMT, f"s{i}", outputs=(f"s{i}.txt",), params={"text": str(i)},
               deliverable=True, **step)  # type: ignore[arg-type]
    return pb.plan()


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_steps_run_at_once_up_to_jobs(actions: Actions, out: Path, jobs: int) -> None:
    actions.quorum = jobs
    runner(independent(4), out, jobs=jobs).run()
    assert sorted(actions.calls) == ["s0", "s1", "s2", "s3"]
    assert actions.peak == jobs


def test_steps_of_one_exclusive_group_never_overlap(actions: Actions, out: Path) -> None:
    actions.quorum = 2
    pb = PlanBuilder("source-fp", "pin")
    for i in range(3):
        pb.add(f"g{i}", "core.write", FMT, f"g{i}", outputs=(f"g{i}.txt",), params={"text": "g"},
               deliverable=True, exclusive="one-gpu")
    pb.add("free", "core.write", FMT, "free", outputs=("free.txt",), params={"text": "f"}, deliverable=True)
    runner(pb.plan(), out, jobs=4).run()
    assert all(len({s for s in group if s.startswith("g")}) <= 1 for group in actions.together)
    assert actions.peak == 2  # the free step ran beside one of them


def test_threaded_steps_share_the_free_cores(actions: Actions, out: Path) -> None:
    actions.quorum = 2
    runner(independent(2, threaded=True), out, jobs=4).run()
    assert actions.threads == {"s0": 2, "s1": 2}
    assert actions.peak == 2


def test_threaded_steps_share_cores_by_their_estimated_time(actions: Actions, out: Path) -> None:
    pb = PlanBuilder("source-fp", "pin")
    pb.add("long", "core.write", FMT, "long", outputs=("long.txt",), params={"text": "l"}, deliverable=True,
           threaded=True, estimate=Estimate(seconds=30.0))
    pb.add("short", "core.write", FMT, "short", outputs=("short.txt",), params={"text": "s"}, deliverable=True,
           threaded=True, estimate=Estimate(seconds=10.0))
    runner(pb.plan(), out, jobs=4).run()
    assert actions.threads == {"long": 3, "short": 1}


def test_a_fixed_thread_count_is_given_to_every_threaded_step(actions: Actions, out: Path) -> None:
    runner(independent(2, threaded=True), out, jobs=4, threads=3).run()
    assert actions.threads == {"s0": 3, "s1": 3}


def test_the_step_nearest_a_deliverable_starts_first_then_the_longest(actions: Actions, out: Path) -> None:
    pb = PlanBuilder("source-fp", "pin")
    pb.add("prep", "core.write", FMT, "prep", outputs=(f"{WORK}/prep.txt",), params={"text": "p"},
           estimate=Estimate(seconds=10.0))  # the longest, but one step further from a deliverable
    pb.add("uses-prep", "core.write", FMT, "uses", inputs={"src": "prep"}, outputs=("u.txt",), deliverable=True)
    pb.add("short", "core.write", FMT, "short", outputs=("short.txt",), params={"text": "s"}, deliverable=True,
           estimate=Estimate(seconds=1.0))
    pb.add("long", "core.write", FMT, "long", outputs=("long.txt",), params={"text": "l"}, deliverable=True,
           estimate=Estimate(seconds=5.0))
    runner(pb.plan(), out, jobs=1).run()
    assert actions.calls == ["long", "short", "prep", "uses-prep"]


# -- --step runs ---------------------------------------------------------------------------


def test_a_step_run_refuses_a_step_whose_inputs_are_not_done(actions: Actions, out: Path) -> None:
    with pytest.raises(InputsNotReadyError) as exc:
        runner(diamond(), out, only=("b",)).run()
    assert exc.value.exit_code == 22
    assert "a" in str(exc.value) and "--step a" in (exc.value.hint or "")
    assert actions.calls == [] and Journal(out).states() == {}


def test_step_runs_make_exactly_the_named_steps(actions: Actions, out: Path) -> None:
    result = runner(diamond(), out, only=("a",)).run()
    assert actions.calls == ["a"]
    assert states(result) == {"a": StepState.DONE, "b": StepState.PENDING, "c": StepState.PENDING}
    result = runner(diamond(), out, only=("b",)).run()
    assert actions.calls == ["a", "b"]
    assert states(result) == {"a": StepState.SKIPPED, "b": StepState.DONE, "c": StepState.PENDING}
    assert "c" not in Journal(out).states()
    actions.calls.clear()
    runner(diamond(), out, only=("b", "c")).run()  # b proven done: only c runs
    assert actions.calls == ["c"]


def test_a_step_run_may_name_a_step_and_its_inputs_together(actions: Actions, out: Path) -> None:
    runner(diamond(), out, only=("a", "c")).run()
    assert actions.calls == ["a", "c"]


def test_a_step_run_naming_an_unknown_step_is_a_usage_error(actions: Actions, out: Path) -> None:
    with pytest.raises(UsageError, match="'nope' is not a step"):
        runner(diamond(), out, only=("nope",)).run()


def test_a_step_whose_lock_is_held_elsewhere_is_refused(actions: Actions, out: Path) -> None:
    held = StepLock(out, "b")
    held.acquire()
    try:
        with pytest.raises(LockedError) as exc:
            runner(diamond(), out, jobs=1).run()
    finally:
        held.release()
    assert exc.value.exit_code == 14
    assert "b" not in actions.calls and "b" not in Journal(out).states()


def test_a_step_left_started_by_a_killed_run_is_closed_and_rerun(actions: Actions, out: Path) -> None:
    from qwrap.journal import StepRecord

    fp = diamond().by_id()["a"].fingerprint
    Journal(out).record(StepRecord("a", StepState.STARTED, fp))
    runner(diamond(), out).run()
    assert history(out, "a") == ["started", "interrupted", "started", "done"]
    assert "killed" in (list(Journal(out).history("a"))[1]["error"])


# -- disk, intermediates ----------------------------------------------------------------------


def test_a_run_whose_estimates_do_not_fit_the_disk_starts_nothing(actions: Actions, out: Path) -> None:
    pb = PlanBuilder("source-fp", "pin")
    pb.add("huge", "core.write", FMT, "huge", outputs=("huge.txt",), deliverable=True,
           estimate=Estimate(output_bytes=1 << 60, peak_disk_bytes=1 << 60))
    with pytest.raises(InsufficientDiskError) as exc:
        runner(pb.plan(), out).run()
    assert exc.value.exit_code == 9 and actions.calls == []
    runner(pb.plan(), out, preflight=False).run()  # --no-preflight: not checked
    assert actions.calls == ["huge"]


def test_remove_intermediates_keeps_deliverables_and_drops_work_files_and_scratch(actions: Actions,
                                                                                  out: Path) -> None:
    pb = PlanBuilder("source-fp", "pin")
    pb.add("a", "core.write", FMT, "a", outputs=(f"{WORK}/a.txt",), params={"text": "A"},
           scratch=(".checkpoint/layers/a-{fingerprint}",))
    pb.add("b", "core.write", FMT, "b", inputs={"src": "a"}, outputs=("b.txt",), deliverable=True)
    plan = pb.plan()
    runner(plan, out).run()
    scratch = out / plan.steps[0].scratch[0]
    scratch.mkdir(parents=True)
    (scratch / "layer-0").write_text("x")
    removed = remove_intermediates(plan, out)
    assert set(removed) == {out / WORK / "a.txt", scratch}
    assert (out / "b.txt").is_file() and not scratch.parent.exists()
    actions.calls.clear()
    runner(plan, out).run()  # and a rerun still makes nothing
    assert actions.calls == []
