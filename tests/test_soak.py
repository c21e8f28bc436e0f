"""The randomized kill soak, small: a seeded handful of SIGKILLs of random processes of
qwrap's tree at random moments of a GGUF run with an importance matrix; every kill must leave
no orphan and no unvouched final file, and the run that completes after it must be
byte-identical to an uninterrupted one. bench/soak.py runs the large, mixed version (AWQ/GPTQ
and the evaluation steps too) and writes bench/results/soak.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwrap.toolchain import Toolchain
from soak import soak

pytestmark = pytest.mark.slow
KILLS = 3
SEED = 12


def test_random_kills_are_survived(tiny_model: Path, tmp_path: Path, corpus: Path, toolchain: Toolchain) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus.read_text()[:6000])  # a short importance matrix: the soak is about the kills
    args = ["-q", "Q4_K_M", "-q", "Q8_0", "--imatrix", "auto", "--calib", str(calib), "--no-eval"]
    result = soak(tiny_model, tmp_path, args, kills=KILLS, seed=SEED, budget_s=240)
    (tmp_path / "soak.json").write_text(json.dumps(result, indent=2))  # the results file
    assert result["kills"] == KILLS, result
    assert result["survived"] == KILLS, json.dumps(result["failures"], indent=2)
    assert result["completed_runs"] >= 1
