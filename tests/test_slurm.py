"""Issue 10 on a real Slurm: the emitted scripts of a multi-type GGUF plan, submitted to a
single-node cluster started here, make the artifacts one machine makes; an array task cancelled
mid-step, then a resubmission, completes the plan identically.

The two plans run on the cluster at once (its two CPUs take a job each), submitted, watched,
cancelled and resubmitted by one work on the session's lane (background.py: they spend most of
their time waiting for the scheduler and in one-thread steps), which the tests read."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from background import Lane, folder, prefetch, prefetched
from conftest import REQUIRE, artifact_shas, run_qwrap
from moments import wait_for
from qwrap.journal import Journal
from qwrap.plan import StepState
from slurmcluster import SlurmCluster, missing
from test_scaleout import options

pytestmark = pytest.mark.slow
CANCELLED_STEP = "gguf.weights:Q4_K_M"  # the longest step of the plan (~13 s): cancelled mid-step


def started_cluster(on: Lane, root: Path) -> SlurmCluster:
    """A single-node cluster in ``root``, stopped when ``on`` closes."""
    reason = missing()
    if reason:
        if REQUIRE:
            pytest.fail(reason + " - required under make test / CI", pytrace=False)
        pytest.skip(reason)
    cluster = SlurmCluster(root)
    on.cleanup(cluster.stop)
    cluster.start()
    return cluster


def emit(model: Path, out: Path, jobs: Path, corpus: Path,
         run: Callable[..., subprocess.CompletedProcess[str]] = run_qwrap) -> Path:
    proc = run("plan", str(model), "-o", str(out), *options(corpus), "--jobs", "1",
               "--emit", "slurm", str(jobs), "--partition", "debug")
    assert proc.returncode == 0, proc.stderr
    return jobs / "submit.sh"


def all_done(out: Path) -> list[dict]:
    status = json.loads(run_qwrap("status", str(out), "--json").stdout)
    assert {s["state"] for s in status["steps"]} == {"done"}, status["steps"]
    return status["steps"]


@dataclass(frozen=True)
class Submitted:
    out: Path
    jobs: dict[str, str]  # script name -> job id
    states: dict[str, str]  # final state by job id (an array's tasks as ID_N)


@dataclass(frozen=True)
class SlurmRuns:
    uninterrupted: Submitted
    cancelled: Submitted  # its task of CANCELLED_STEP cancelled once its tool ran
    cancelled_step_state: StepState  # the journal's, once the cancelled plan's jobs ended
    resubmitted: Submitted  # the same scripts again, in the same folder
    seconds: float  # from the cancelled plan's submission to the resubmission's end
    logs: str  # the cluster's


def _on_the_cluster(model: Path, corpus: Path, on: Lane, root: Path) -> SlurmRuns:
    """Both plans emitted and submitted (the jobs inherit the lane's environment): the
    uninterrupted one, then the one whose CANCELLED_STEP task is cancelled as soon as the
    journal records its tool, resubmitted once its jobs have ended."""
    cluster = started_cluster(on, folder(root / "slurm"))
    plain, cut = root / "uninterrupted", root / "cancelled"
    plain_jobs = cluster.submit(emit(model, plain / "o", plain / "jobs", corpus, run=on.qwrap), env=on.env)
    submit = emit(model, cut / "o", cut / "jobs", corpus, run=on.qwrap)
    started = time.monotonic()
    jobs = cluster.submit(submit, env=on.env)
    stage = next(job for name, job in jobs.items() if "gguf.weights" in name)
    wait_for(cut / "o", f"child:{CANCELLED_STEP}", timeout=600)  # the task's tool is running: cancel it
    cluster.run("scancel", f"{stage}_0")
    states = cluster.wait(list(jobs.values()))
    cut_state = Journal(cut / "o").states()[CANCELLED_STEP].state
    again = cluster.submit(submit, env=on.env)
    again_states = cluster.wait(list(again.values()))
    seconds = time.monotonic() - started
    plain_states = cluster.wait(list(plain_jobs.values()))
    return SlurmRuns(Submitted(plain / "o", plain_jobs, plain_states), Submitted(cut / "o", jobs, states), cut_state,
                     Submitted(cut / "o", again, again_states), seconds, cluster.logs())


# last on the session's lane: it runs beside the tests before this module's, whose own runs
# leave a core idle now and then
prefetch(__name__, "slurm.runs", _on_the_cluster, ("tiny_model", "corpus"), last=True)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> SlurmRuns:
    return prefetched(request, "slurm.runs")


def test_a_task_cancelled_mid_step_then_resubmitted_completes_identically(
        runs: SlurmRuns, scaleout_reference: dict[str, str]) -> None:
    jobs, states = runs.cancelled.jobs, runs.cancelled.states
    stage = next(job for name, job in jobs.items() if "gguf.weights" in name)
    assert states[f"{stage}_0"] == "CANCELLED", states
    assert states[jobs[next(n for n in jobs if "finish" in n)]] != "COMPLETED"  # its dependency failed
    assert runs.cancelled_step_state in ("interrupted", "started")
    print(f"cancelled, resubmitted and finished in {runs.seconds:.1f} s")
    assert set(runs.resubmitted.states.values()) == {"COMPLETED"}, (runs.resubmitted.states, runs.logs)
    out = runs.resubmitted.out
    assert artifact_shas(out) == scaleout_reference
    all_done(out)
    done = [r for r in Journal(out).records() if r.get("state") == "done"]
    for step in ("gguf.convert", "gguf.quantize:Q4_K_M", "gguf.weights:Q8_0"):  # the resubmission reused them
        assert sum(r["step"] == step for r in done) == 1, step
    assert not list(out.glob("*.partial"))


def test_slurm_jobs_make_what_one_machine_makes(runs: SlurmRuns, scaleout_reference: dict[str, str]) -> None:
    out, jobs, states = runs.uninterrupted.out, runs.uninterrupted.jobs, runs.uninterrupted.states
    print(f"{len(jobs)} Slurm jobs ({len(states)} tasks)")
    assert set(states.values()) == {"COMPLETED"}, (states, runs.logs)
    assert artifact_shas(out) == scaleout_reference
    steps = all_done(out)
    assert all("slurm job" in s["by"] for s in steps)  # every step ran as a job, none in the finishing run
    assert (out / "README.md").exists()  # the finishing run wrote the model card
    assert not list((out / ".checkpoint" / "work").glob("*.gguf"))  # and removed the intermediate
