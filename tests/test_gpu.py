"""GPU paths: the CUDA build of llama.cpp loads and runs an artifact on the GPU.
Skipped with the reason on hosts without a CUDA device; scripts/gpu-check runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_qwrap
from qwrap.toolchain import Toolchain

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # slow: every one needs the toolchain or the converter environment


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


def test_awq_and_gptq_quantize_and_validate_on_the_gpu(tiny_model: Path, tmp_path: Path, corpus: Path) -> None:
    """One run, both formats on CUDA: each quantize step reports its peak GPU memory."""
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "o"), "-f", "awq", "-f", "gptq", "--device", "cuda",
                     "--calib", str(corpus), "--calib-samples", "8", "--calib-seq-len", "128",
                     "--eval-text", str(corpus), "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {a["format"] for a in result["artifacts"]} == {"awq", "gptq"}
    assert all(a["validated"] and a["quality"]["kld_mean"] >= 0 for a in result["artifacts"]), result["artifacts"]
    steps = {s["id"]: s for s in result["steps"]}
    for fmt in ("awq", "gptq"):
        assert steps[f"{fmt}.quantize"]["peak_gpu_bytes"] > 0, steps[f"{fmt}.quantize"]


def test_auto_gptq_backend_runs_on_the_gpu(tiny_model: Path, tmp_path: Path, corpus: Path) -> None:
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "o"), "-f", "gptq", "--backend", "auto-gptq",
                     "--device", "cuda", "--calib", str(corpus), "--calib-samples", "8", "--calib-seq-len", "128",
                     "--no-eval", "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    (art,) = json.loads(proc.stdout)["artifacts"]
    assert art["validated"] and art["peak_gpu_bytes"] > 0, art


def test_imatrix_validation_and_evaluation_offload_to_the_gpu(tiny_model: Path, tmp_path: Path, corpus: Path,
                                                              toolchain: Toolchain) -> None:
    out = tmp_path / "o"
    proc = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "--calib", str(corpus),
                     "--eval-text", str(corpus), "--json")
    assert proc.returncode == 0, proc.stderr
    logs = {p.name: p.read_text(errors="replace") for p in (out / ".checkpoint" / "logs").glob("*.log")}
    for step in ("gguf.imatrix", "gguf.validate-Q4_K_M", "gguf.eval-base", "gguf.eval-Q4_K_M"):
        log = next((text for name, text in logs.items() if name.startswith(step)), None)
        assert log is not None, (step, sorted(logs))
        assert "offloaded" in log and "layers to GPU" in log, (step, log[-2000:])
