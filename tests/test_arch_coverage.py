"""MoE expert coverage: how many calibration tokens each expert of each layer got, counted by
the importance matrix, in the result and the card; a warning below --min-expert-tokens, a
failure before any quantization with --strict-coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from background import prefetched
from conftest import calibration_sample, run_qwrap
from qwrap.toolchain import Toolchain
from test_budget import tiny_moe  # registers the MoE budget run (background.py)

pytestmark = pytest.mark.slow


def steps_started(out: Path) -> set[str]:
    lines = (out / ".checkpoint" / "journal.jsonl").read_text().splitlines()
    return {r["step"] for r in map(json.loads, lines) if r.get("state") == "started"}


def test_expert_coverage_is_counted_reported_and_enforced(tiny_model: Path, convert_python: Path, corpus: Path,
                                                          tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The counts, the warning and the card of the MoE size-budget run (test_budget.py, the
    same tiny Mixtral, run with --min-expert-tokens 100000); then a run with --strict-coverage."""
    model = tiny_moe(tiny_model, convert_python)
    calib = tmp_path / "calib.txt"
    calibration_sample(corpus, calib, 8000)  # a short importance matrix (~2,000 tokens): the counts are what matter
    common = ["-q", "Q4_K_M", "--calib", str(calib), "--no-eval", "--json"]
    plan = run_qwrap("plan", str(model), "-o", str(tmp_path / "o"), *common)
    assert plan.returncode == 0, plan.stderr
    assert "gguf.coverage" in [s["id"] for s in json.loads(plan.stdout)["steps"]]
    # a minimum above what any expert can get: a warning, the counts still reported
    out, proc = prefetched(request, "budget.moe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expert coverage: 8 of 8 experts got fewer than 100000" in proc.stderr
    coverage = json.loads(proc.stdout)["expert_coverage"]
    assert coverage["source"] == "importance matrix" and coverage["min_tokens"] == 100000 and coverage["below"] == 8
    assert [c["layer"] for c in coverage["layers"]] == [0, 1]
    for layer in coverage["layers"]:  # 4 experts, 2 active: every token counted twice per layer
        assert len(layer["tokens"]) == 4 and all(t > 0 for t in layer["tokens"])
    assert len({sum(c["tokens"]) for c in coverage["layers"]}) == 1
    assert list(out.glob("*.gguf")), "a warning does not stop the run"
    card = (out / "README.md").read_text()
    assert "## Expert coverage" in card and "| layer | experts | fewest tokens |" in card
    # with --strict-coverage: a failure before anything is quantized
    strict = run_qwrap("run", str(model), "-o", str(tmp_path / "s"), "--min-expert-tokens", "100000",
                       "--strict-coverage", *common)
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert "expert coverage: 8 of 8 experts got fewer than 100000" in strict.stderr and "Traceback" not in strict.stderr
    assert not list((tmp_path / "s").glob("*.gguf")) and "gguf.quantize:Q4_K_M" not in steps_started(tmp_path / "s")


@pytest.mark.backend
def test_gptq_fails_below_the_minimum_with_strict_coverage(tiny_model: Path, convert_python: Path, corpus: Path,
                                                           tmp_path: Path, toolchain: Toolchain) -> None:
    """GPTQ (gptqmodel) counts each expert's samples from the backend's per-module log (the
    architecture matrix asserts the counts, routed and with --moe-routing all); routed as the
    model routes, with --strict-coverage, an expert under the minimum fails the quantize step and
    nothing is delivered. --moe-routing all is planned for gptqmodel and refused for autoawq."""
    model = tiny_moe(tiny_model, convert_python)
    common = ["-f", "gptq", "--calib", str(corpus), "--calib-samples", "8", "--calib-seq-len", "64", "--no-eval"]
    plan = run_qwrap("plan", str(model), "-o", str(tmp_path / "o"), "--moe-routing", "all", *common)
    assert plan.returncode == 0 and "every calibration token goes through each of the 4 experts" in plan.stdout
    strict = run_qwrap("run", str(model), "-o", str(tmp_path / "s"), "--min-expert-tokens", "100000",
                       "--strict-coverage", *common)
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert "expert coverage: 8 of 8 experts got fewer than 100000" in strict.stderr
    assert not list((tmp_path / "s").glob("*GPTQ*"))
    refused = run_qwrap("plan", str(model), "-o", str(tmp_path / "a"), "--moe-routing", "all", "--backend",
                        "autoawq", "-f", "awq", "--calib", str(corpus))
    assert "FAIL moe routing: --moe-routing all needs the gptqmodel backend, not autoawq" in refused.stdout
