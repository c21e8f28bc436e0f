"""The randomized kill soak, small: a seeded handful of SIGKILLs of qwrap or of the tool a step
just started, each at a named moment of a GGUF run with an importance matrix (tests/soak.py,
tests/moments.py; the seed, in the test id, picks the same moments on any machine); every kill
must leave no orphan and no unvouched final file, and the run that completes after it must be
byte-identical to an uninterrupted one. bench/soak.py runs the large, mixed version (AWQ/GPTQ
and the evaluation steps too) and writes bench/results/soak.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from background import Lane, prefetch, prefetched
from qwrap.toolchain import Toolchain
from soak import soak

pytestmark = pytest.mark.slow
KILLS = 3
SEED = 12


def _soaked(tiny_model: Path, corpus: Path, _: Toolchain, on: Lane, root: Path) -> dict[str, Any]:
    """The soak of SEED (on the session's lane: background.py), its results file beside it."""
    calib = root / "calib.txt"
    calib.write_text(corpus.read_text()[:6000])  # a short importance matrix: the soak is about the kills
    args = ["-q", "Q4_K_M", "-q", "Q8_0", "--imatrix", "auto", "--calib", str(calib), "--no-eval"]
    result = soak(tiny_model, root, args, kills=KILLS, seed=SEED, budget_s=240, env=on.env)
    (root / "soak.json").write_text(json.dumps(result, indent=2))  # the results file
    return result


prefetch(__name__, "soak.seed", _soaked, ("tiny_model", "corpus", "toolchain"))


@pytest.mark.parametrize("seed", [SEED], ids=lambda seed: f"seed{seed}")
def test_random_kills_are_survived(request: pytest.FixtureRequest, seed: int) -> None:
    result = prefetched(request, "soak.seed")
    assert result["seed"] == seed
    at = [(k["moment"], k["victim"]) for k in result["log"]]
    assert result["kills"] == KILLS, (at, result)
    assert result["survived"] == KILLS, json.dumps(result["failures"], indent=2)
    assert result["completed_runs"] >= 1
