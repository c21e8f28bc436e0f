"""`qwrap plan` is the plan `run` executes, and the runner executes it as a DAG: independent
steps at the same time within --jobs, their journal consistent, their artifacts unchanged."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from background import Lane, prefetch, prefetched
from conftest import PlannedRun, intervals, overlapping, run_qwrap
from qwrap.journal import Journal
from qwrap.plan import StepState
from qwrap.runner import usable_cores
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow
QUANTS = ("Q4_K_M", "Q8_0", "Q2_K")
STEP_KEYS = {"id", "kind", "format", "label", "inputs", "outputs", "params", "files", "fingerprint", "deliverable",
             "threaded", "gpu",
             "estimates"}


def qargs(quants: tuple[str, ...] = QUANTS) -> list[str]:
    return [arg for q in quants for arg in ("-q", q)]


def test_plan_is_what_run_executes(imatrix_run: PlannedRun) -> None:
    """...and with the default --jobs (0: every usable core) independent steps run at once."""
    plan, result, out = imatrix_run.plan, imatrix_run.result, imatrix_run.out
    assert plan["schema"] == "qwrap.plan/2"
    for step in plan["steps"]:
        assert set(step) == STEP_KEYS, step["id"]
        assert set(step["estimates"]) == {"output_bytes", "peak_ram_bytes", "peak_disk_bytes", "seconds"}
        assert "threads" not in step["params"]  # runtime choices are not part of a step
    steps = {s["id"]: s for s in plan["steps"]}
    assert steps["gguf.quantize:IQ2_XS"]["inputs"] == {"model": "gguf.convert", "imatrix": "gguf.imatrix"}
    assert "imatrix" not in steps["gguf.quantize:Q8_0"]["inputs"]  # Q8_0 ignores an imatrix
    calib = imatrix_run.options[imatrix_run.options.index("--calib") + 1]
    assert steps["gguf.imatrix"]["files"]["calib"] == calib and Path(calib).is_file()
    assert plan["totals"]["peak_disk_bytes"] == sum(s["estimates"]["peak_disk_bytes"] for s in plan["steps"])
    assert [(s["id"], s["fingerprint"]) for s in result["steps"]] == [(s["id"], s["fingerprint"]) for s in plan["steps"]]
    assert {s["state"] for s in result["steps"]} == {"done"}
    assert imatrix_run.plan_after["steps"] == plan["steps"]  # the same plan, also once the run has happened
    if usable_cores() > 1:
        spans = intervals(out)
        pairs = overlapping(spans)
        assert pairs, spans  # quantizations share the cores, validations overlap the next
        assert_inputs_done_first(pairs, steps)
    assert {st.state for st in Journal(out).states().values()} == {StepState.DONE}


def assert_inputs_done_first(pairs: list[tuple[str, str]], steps: dict[str, dict]) -> None:
    """Nothing ran at the same time as a step it reads."""
    for a, b in pairs:
        assert a not in steps[b]["inputs"].values() and b not in steps[a]["inputs"].values(), (a, b)


@dataclass(frozen=True)
class JobsRun:
    out: Path
    shas: dict[str, str]
    threads: set[str]  # the thread counts llama-quantize was given


def jobs_run(model: Path, out: Path, *extra: str, run: Callable[..., subprocess.CompletedProcess[str]] = run_qwrap
             ) -> JobsRun:
    proc = run("run", str(model), "-o", str(out), *qargs(), *extra, "--json")
    assert proc.returncode == 0, proc.stderr
    threads = set()
    for quant in QUANTS:
        log = (out / ".checkpoint" / "logs" / f"gguf.quantize-{quant}.log").read_text()
        threads.add(re.search(rf"llama-quantize \S+ \S+ {quant} (\d+)", log)[1])  # type: ignore[index]
    # one consistent journal: every step started once and finished once
    assert {st.state for st in Journal(out).states().values()} == {StepState.DONE}
    return JobsRun(out, {a["quant"]: a["sha256"] for a in json.loads(proc.stdout)["artifacts"]}, threads)


def _jobs_2(model: Path, _: Toolchain, on: Lane, root: Path) -> JobsRun:
    return jobs_run(model, root / "jobs2", "--jobs", "2", run=on.qwrap)


def _jobs_1(model: Path, _: Toolchain, on: Lane, root: Path) -> JobsRun:
    return jobs_run(model, root / "jobs1", "--jobs", "1", "--threads", "2", run=on.qwrap)


JOBS_TESTS = ("test_independent_steps_run_at_once_sharing_the_cores",
              "test_jobs_1_runs_one_step_at_a_time_and_threads_fixes_the_count")
prefetch(__name__, "plan_runner.jobs2", _jobs_2, ("tiny_model", "toolchain"), tests=JOBS_TESTS)
prefetch(__name__, "plan_runner.jobs1", _jobs_1, ("tiny_model", "toolchain"), tests=JOBS_TESTS)


@pytest.fixture(scope="module")
def jobs_runs(request: pytest.FixtureRequest) -> dict[str, JobsRun]:
    """The same three types on --jobs 2 (the runner shares the cores) and on --jobs 1 with
    --threads 2 (one step at a time, each tool on the threads asked for); on the session's
    lane (background.py)."""
    return {"2": prefetched(request, "plan_runner.jobs2"), "1": prefetched(request, "plan_runner.jobs1")}


def test_independent_steps_run_at_once_sharing_the_cores(jobs_runs: dict[str, JobsRun]) -> None:
    """On --jobs 2 with three types ready at once, the quantizations get one thread each and
    run side by side; nothing runs before its input is done."""
    run = jobs_runs["2"]
    spans = intervals(run.out)
    pairs = overlapping(spans)
    assert pairs, spans
    assert all("gguf.convert" not in pair for pair in pairs)  # nothing runs before its input is done
    assert "1" in run.threads, run.threads


def test_jobs_1_runs_one_step_at_a_time_and_threads_fixes_the_count(jobs_runs: dict[str, JobsRun]) -> None:
    run = jobs_runs["1"]
    assert overlapping(intervals(run.out)) == []
    assert run.threads == {"2"}, run.threads
    assert run.shas == jobs_runs["2"].shas  # the same artifacts either way


def test_health_check_timeout_keeps_the_environment(tmp_path: Path) -> None:
    """A health check that does not answer in time is an error, not a reason to delete a
    working environment and rebuild it."""
    from qwrap import envs

    cache = tmp_path / "cache"
    import os

    os.environ["QWRAP_CACHE_DIR"] = str(cache)
    try:
        env = envs.env_path("convert")
    finally:
        del os.environ["QWRAP_CACHE_DIR"]
    python = env / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nsleep 30\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    (env / envs.MARKER).write_text("{}")
    proc = run_qwrap("env", "create", "convert", env={"QWRAP_CACHE_DIR": str(cache), "QWRAP_HEALTH_TIMEOUT": "1"})
    assert proc.returncode == 13, proc.stderr
    assert "did not finish within 1 s" in proc.stderr
    assert python.exists() and (env / envs.MARKER).exists()
