"""`qwrap plan` is the plan `run` executes, and the runner executes it as a DAG: independent
steps at the same time within --jobs, their journal consistent, their artifacts unchanged."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from conftest import intervals, overlapping, run_qwrap
from qwrap.journal import Journal
from qwrap.plan import StepState
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow
QUANTS = ("Q4_K_M", "Q8_0", "Q2_K")
STEP_KEYS = {"id", "kind", "format", "label", "inputs", "outputs", "params", "files", "fingerprint", "deliverable",
             "threaded", "gpu",
             "estimates"}


def qargs(quants: tuple[str, ...] = QUANTS) -> list[str]:
    return [arg for q in quants for arg in ("-q", q)]


def test_plan_is_what_run_executes(tiny_model: Path, tmp_path: Path, corpus: Path, toolchain: Toolchain) -> None:
    options = [*qargs(("Q4_K_M", "Q8_0", "IQ2_XS")), "--imatrix", "auto", "--calib", str(corpus)]
    out = tmp_path / "o"
    proc = run_qwrap("plan", str(tiny_model), "-o", str(out), *options, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["schema"] == "qwrap.plan/2" and not out.exists()
    for step in plan["steps"]:
        assert set(step) == STEP_KEYS, step["id"]
        assert set(step["estimates"]) == {"output_bytes", "peak_ram_bytes", "peak_disk_bytes", "seconds"}
        assert "threads" not in step["params"]  # runtime choices are not part of a step
    steps = {s["id"]: s for s in plan["steps"]}
    assert steps["gguf.quantize:IQ2_XS"]["inputs"] == {"model": "gguf.convert", "imatrix": "gguf.imatrix"}
    assert "imatrix" not in steps["gguf.quantize:Q8_0"]["inputs"]  # Q8_0 ignores an imatrix
    assert steps["gguf.imatrix"]["files"]["calib"] == str(corpus)
    assert plan["totals"]["peak_disk_bytes"] == sum(s["estimates"]["peak_disk_bytes"] for s in plan["steps"])
    ran = run_qwrap("run", str(tiny_model), "-o", str(out), *options, "--json")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert [(s["id"], s["fingerprint"]) for s in result["steps"]] == [(s["id"], s["fingerprint"]) for s in plan["steps"]]
    assert {s["state"] for s in result["steps"]} == {"done"}
    again = json.loads(run_qwrap("plan", str(tiny_model), "-o", str(out), *options, "--json").stdout)
    assert again["steps"] == plan["steps"]  # the same plan, also once the run has happened


def test_independent_steps_run_at_once_and_jobs_1_runs_one(tiny_model: Path, tmp_path: Path,
                                                          toolchain: Toolchain) -> None:
    shas = {}
    for jobs in ("0", "1"):
        out = tmp_path / f"jobs{jobs}"
        proc = run_qwrap("run", str(tiny_model), "-o", str(out), *qargs(), "--jobs", jobs, "--json")
        assert proc.returncode == 0, proc.stderr
        shas[jobs] = {a["quant"]: a["sha256"] for a in json.loads(proc.stdout)["artifacts"]}
        spans = intervals(out)
        pairs = overlapping(spans)
        if jobs == "1":
            assert pairs == []
        else:
            assert pairs, spans  # 2 cores: quantizations share them, validations overlap the next
            assert all("gguf.convert" not in pair for pair in pairs)  # nothing runs before its input is done
        # one consistent journal: every step started once and finished once
        assert {st.state for st in Journal(out).states().values()} == {StepState.DONE}
    assert shas["0"] == shas["1"]  # the same artifacts either way


def test_cores_are_shared_among_quantizations(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    """On --jobs 2 with three types ready at once, the quantizations get one thread each and run
    side by side; --threads fixes the count."""
    for extra, expected in ((["--jobs", "2"], {"1"}), (["--jobs", "2", "--threads", "2"], {"2"})):
        out = tmp_path / "-".join(extra)
        proc = run_qwrap("run", str(tiny_model), "-o", str(out), *qargs(), *extra)
        assert proc.returncode == 0, proc.stderr
        threads = set()
        for quant in QUANTS:
            log = (out / ".checkpoint" / "logs" / f"gguf.quantize-{quant}.log").read_text()
            threads.add(re.search(rf"llama-quantize \S+ \S+ {quant} (\d+)", log)[1])  # type: ignore[index]
        assert expected <= threads, threads


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
