"""Issue 10 on a real Slurm: the emitted scripts of a multi-type GGUF plan, submitted to a
single-node cluster started here, make the artifacts one machine makes; an array task cancelled
mid-step, then a resubmission, completes the plan identically.

The two plans run on the cluster at once (its two CPUs take a job each): the uninterrupted one
is submitted from a second lane (background.py) as the module starts, the cancelled one from
the test that cancels it, which comes first."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from background import Lane, fixture_or_outcome, folder, lane, needing, selected
from conftest import REQUIRE, artifact_shas, run_qwrap
from moments import wait_for
from qwrap.journal import Journal
from slurmcluster import SlurmCluster, missing
from test_scaleout import options

pytestmark = pytest.mark.slow
CANCELLED_STEP = "gguf.weights:Q4_K_M"  # the longest step of the plan (~13 s): cancelled mid-step


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = missing()
    if reason:
        if REQUIRE:
            pytest.fail(reason + " - required under make test / CI", pytrace=False)
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


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


def test_a_task_cancelled_mid_step_then_resubmitted_completes_identically(
        cluster: SlurmCluster, tiny_model: Path, corpus: Path, tmp_path: Path,
        scaleout_reference: dict[str, str]) -> None:
    out = tmp_path / "o"
    submit = emit(tiny_model, out, tmp_path / "jobs", corpus)
    started = time.monotonic()
    jobs = cluster.submit(submit)
    stage = next(job for name, job in jobs.items() if "gguf.weights" in name)
    wait_for(out, f"child:{CANCELLED_STEP}", timeout=600)  # the task's tool is running: cancel it
    cluster.run("scancel", f"{stage}_0")
    states = cluster.wait(list(jobs.values()))
    assert states[f"{stage}_0"] == "CANCELLED", states
    assert states[jobs[next(n for n in jobs if "finish" in n)]] != "COMPLETED"  # its dependency failed
    assert Journal(out).states()[CANCELLED_STEP].state in ("interrupted", "started")
    again = cluster.submit(submit)
    states = cluster.wait(list(again.values()))
    print(f"cancelled, resubmitted and finished in {time.monotonic() - started:.1f} s")
    assert set(states.values()) == {"COMPLETED"}, (states, cluster.logs())
    assert artifact_shas(out) == scaleout_reference
    all_done(out)
    done = [r for r in Journal(out).records() if r.get("state") == "done"]
    for step in ("gguf.convert", "gguf.quantize:Q4_K_M", "gguf.weights:Q8_0"):  # the resubmission reused them
        assert sum(r["step"] == step for r in done) == 1, step
    assert not list(out.glob("*.partial"))


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lane]:
    root = tmp_path_factory.mktemp("background")
    with lane(root) as on:
        if "test_slurm_jobs_make_what_one_machine_makes" in selected(request):
            needs = [fixture_or_outcome(request, name) for name in ("cluster", "tiny_model", "corpus")]
            on.start(("uninterrupted",), needing(needs, _submitted_and_finished), on, folder(root / "uninterrupted"))
        yield on


def _submitted_and_finished(cluster: SlurmCluster, model: Path, corpus: Path, on: Lane,
                            tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The plan's scripts emitted and submitted (with the lane's environment, which the jobs
    inherit): the output folder, the jobs, their final states."""
    out = tmp_path / "o"
    submit = emit(model, out, tmp_path / "jobs", corpus, run=on.qwrap)
    started = time.monotonic()
    jobs = cluster.submit(submit, env=on.env)
    states = cluster.wait(list(jobs.values()))
    print(f"{len(jobs)} Slurm jobs ({len(states)} tasks) in {time.monotonic() - started:.1f} s")
    return out, jobs, states


def test_slurm_jobs_make_what_one_machine_makes(cluster: SlurmCluster, background: Lane,
                                                scaleout_reference: dict[str, str]) -> None:
    out, jobs, states = background.result("uninterrupted")
    assert set(states.values()) == {"COMPLETED"}, (states, cluster.logs())
    assert artifact_shas(out) == scaleout_reference
    steps = all_done(out)
    assert all("slurm job" in s["by"] for s in steps)  # every step ran as a job, none in the finishing run
    assert (out / "README.md").exists()  # the finishing run wrote the model card
    assert not list((out / ".checkpoint" / "work").glob("*.gguf"))  # and removed the intermediate
