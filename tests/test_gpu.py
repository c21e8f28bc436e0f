"""GPU paths: the CUDA build of llama.cpp loads and runs an artifact on the GPU.
Skipped with the reason on hosts without a CUDA device; scripts/gpu-check runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_qwrap
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.gpu


def test_toolchain_is_the_cuda_build(toolchain: Toolchain) -> None:
    assert toolchain.variant == "cuda", "on a GPU host `make llama` must build with CUDA"


def test_gguf_artifact_runs_on_the_gpu(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "o"), "-q", "Q4_K_M", "--json")
    assert proc.returncode == 0, proc.stderr
    artifact = json.loads(proc.stdout)["artifacts"][0]["path"]
    run = subprocess.run([str(toolchain.tool("llama-simple")), "-m", artifact, "-ngl", "99", "-n", "8", "Hello"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "CUDA" in run.stderr and "offloaded" in run.stderr
