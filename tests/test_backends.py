"""AWQ/GPTQ workers end to end in their real environments, on a tiny Llama (3 layers,
hidden 128) with a few calibration samples: quantize, reload and compare (hf_validate),
kill mid-run and resume to a byte-identical artifact, and auto-gptq's refusal on CPU.

Environment pythons come from QWRAP_ENV_<NAME> (QWRAP_ENV_AUTOAWQ, QWRAP_ENV_GPTQMODEL,
QWRAP_ENV_AUTO_GPTQ: one per declared backend), else from qwrap's cache; a test whose environment
is missing is skipped with the command that creates it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, _missing, make_model
from qwrap import envs
from qwrap.errors import ToolchainMissingError
from qwrap.workers import protocol as p
from qwrap.workers.backends import DECLARED_BACKENDS

pytestmark = pytest.mark.backend

ENV_VARS = {b.name: "QWRAP_ENV_" + b.name.upper().replace("-", "_") for b in DECLARED_BACKENDS}
CORPUS = REPO / "tests" / "data" / "corpus.txt"
LAYERS = 3
TINY = ("--layers", str(LAYERS), "--hidden", "128", "--ffn", "256", "--heads", "2", "--kv-heads", "2",
        "--vocab", "512")
CASES = [("autoawq", "awq"), ("gptqmodel", "awq"), ("gptqmodel", "gptq")]  # auto-gptq needs CUDA: its own tests
WORKER_TIMEOUT_S = 900


def env_python(backend: str) -> Path:
    """The backend environment's python: $QWRAP_ENV_<NAME>, else qwrap's own environment in
    the cache (`make backend-envs`); missing -> skip, or fail under make test / CI."""
    value = os.environ.get(ENV_VARS[backend])
    if value:
        return Path(value)
    try:
        return envs.find_env(backend).python
    except ToolchainMissingError:
        _missing(f"the {backend} environment", f"run `qwrap env create {backend}` or `make backend-envs`")
        raise


@dataclass
class Run:
    events: list[dict[str, Any]]
    returncode: int
    log: Path
    seconds: float

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    @property
    def result(self) -> dict[str, Any]:
        assert self.returncode == 0, f"worker failed: {self.of('error')}\nlog: {self.log}"
        (result,) = self.of("result")
        return result


def run_worker(python: Path, job: p.Job, workdir: Path, *,
               kill_when: Callable[[dict[str, Any]], bool] | None = None) -> Run:
    """Start a worker as the parent will (job file, event fd), optionally SIGKILL it when
    ``kill_when(event)`` first holds."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = p.write_job(job, workdir / f"job-{time.monotonic_ns()}.json")
    log = job_path.with_suffix(".log")
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(REPO / "wrapper"), p.EVENT_FD_ENV: str(write_fd),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # One thread: these 2-core hosts are shared, and OpenMP spin-waits under contention.
           "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen([str(python), "-m", p.worker_module(job), str(job_path)], env=env,
                                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    os.close(write_fd)
    events = []
    try:
        with os.fdopen(read_fd, encoding="utf-8") as channel:
            for line in channel:
                events.append(p.parse_event(line))
                if kill_when is not None and kill_when(events[-1]):
                    proc.send_signal(signal.SIGKILL)
                    kill_when = None
        code = proc.wait(timeout=WORKER_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return Run(events, code, log, time.monotonic() - started)


def quantize_job(backend: str, fmt: str, model: Path, base: Path, name: str) -> p.QuantizeJob:
    (base / name).mkdir(parents=True)
    return p.QuantizeJob(
        backend=backend, format=fmt, model=str(model), output_dir=str(base / name),
        checkpoint_dir=str(base / "checkpoint"), device="cpu",
        calibration=p.TextSource(path=str(CORPUS), n_samples=8, seq_len=64, seed=0,
                                 source="corpus.txt", cache_dir=str(base / "calib-cache")),
    )


def validate_job(model: Path, quantized: str) -> p.ValidateJob:
    return p.ValidateJob(model=str(model), quantized=quantized, device="cpu",
                         text=p.TextSource(path=str(CORPUS), n_samples=4, seq_len=64, portion="held_out"))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory: pytest.TempPathFactory, convert_python: Path) -> Path:
    return make_model(convert_python, tmp_path_factory.mktemp("models") / "micro-llama", *TINY)


@dataclass(frozen=True)
class Quantized:
    job: p.QuantizeJob
    run: Run


_done: dict[tuple[str, str], Quantized] = {}


@pytest.fixture
def quantized(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Quantized]:
    """An uninterrupted, checkpointed run per (backend, format), shared by the tests."""

    def get(backend: str, fmt: str) -> Quantized:
        python = env_python(backend)
        if (backend, fmt) not in _done:
            base = tmp_path_factory.mktemp(f"{backend}-{fmt}")
            job = quantize_job(backend, fmt, micro_model, base, "full")
            _done[backend, fmt] = Quantized(job, run_worker(python, job, base / "jobs"))
        return _done[backend, fmt]

    return get


@pytest.mark.parametrize(("backend", "fmt"), CASES)
def test_quantize_end_to_end_and_validate(backend: str, fmt: str, micro_model: Path,
                                          quantized: Callable[[str, str], Quantized]) -> None:
    done = quantized(backend, fmt)
    result, out = done.run.result, Path(done.job.output_dir)
    events = [e["event"] for e in done.run.events]
    assert events[0] == "started" and events[-1] == "result"
    assert [e["index"] for e in done.run.of("layer_done")] == list(range(LAYERS))
    assert all(e["peak_rss_bytes"] > 0 and e["total"] == LAYERS for e in done.run.of("layer_done"))
    assert len(done.run.of("checkpoint_saved")) == LAYERS

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == fmt
    assert config["quantization_config"]["bits"] == 4
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (micro_model / name).read_bytes(), name
    assert set(result["files"]) == set(tree_bytes(out))
    metadata = json.loads((out / "qwrap_metadata.json").read_text())
    expected = {"n_samples": 8, "seq_len": 64, "seed": 0, "source": "corpus.txt"}
    assert {k: metadata["calibration"][k] for k in expected} == expected

    check = run_worker(env_python("gptqmodel"), validate_job(micro_model, str(out)), out.parent / "validate")
    stats = check.result["metadata"]
    assert stats["finite"] is True and stats["tokens"] == 4 * 64
    assert 0 <= stats["kl_divergence"] < 0.1, stats  # random weights: nearly uniform outputs
    assert stats["top1_agreement"] > 0.3, stats


@pytest.mark.parametrize(("backend", "fmt"), CASES)
def test_killed_run_resumes_to_a_byte_identical_artifact(
        backend: str, fmt: str, micro_model: Path, tmp_path: Path,
        quantized: Callable[[str, str], Quantized]) -> None:
    reference = quantized(backend, fmt)
    assert reference.run.result
    python = env_python(backend)
    job = quantize_job(backend, fmt, micro_model, tmp_path, "first")
    killed = run_worker(python, job, tmp_path / "jobs", kill_when=lambda e: e["event"] == "layer_done")
    assert killed.returncode == -signal.SIGKILL
    assert not killed.of("result")

    # The parent gives every attempt a fresh output folder; the checkpoints stay.
    (tmp_path / "second").mkdir()
    resumed = run_worker(python, replace(job, output_dir=str(tmp_path / "second")), tmp_path / "jobs")
    assert resumed.result
    assert [e["index"] for e in resumed.of("layer_done") if e["resumed"]] == [0]
    assert [e["index"] for e in resumed.of("layer_started")] == list(range(LAYERS) if backend == "autoawq"
                                                                   else range(1, LAYERS))
    assert resumed.result["metadata"]["calibration_cache_hit"] is True
    assert tree_bytes(tmp_path / "second") == tree_bytes(Path(reference.job.output_dir))


def test_bad_group_size_fails_before_any_layer(micro_model: Path, tmp_path: Path) -> None:
    job = replace(quantize_job("gptqmodel", "gptq", micro_model, tmp_path, "out"), group_size=96)
    run = run_worker(env_python("gptqmodel"), job, tmp_path / "jobs")
    (error,) = run.of("error")
    assert run.returncode == 1 and error["kind"] == "unsupported"
    assert "group size 96" in error["message"] and not run.of("layer_started")


def _has_cuda(python: Path) -> bool:
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, check=True)
    return probe.stdout.strip() == "True"


def test_auto_gptq_env_imports_its_pinned_stack() -> None:
    python = env_python("auto-gptq")
    probe = subprocess.run(
        [str(python), "-c", "import auto_gptq, peft, datasets, transformers; "
                            "print(auto_gptq.__version__, transformers.__version__)"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.split()[-2:] == ["0.7.1", "4.45.2"]


def test_auto_gptq_refuses_on_cpu_before_loading_the_model(tmp_path: Path) -> None:
    python = env_python("auto-gptq")
    if _has_cuda(python):
        pytest.skip("a CUDA device is visible: auto-gptq does not refuse here")
    # A model path that does not exist: any attempt to load it would fail differently.
    job = quantize_job("auto-gptq", "gptq", tmp_path / "no-such-model", tmp_path, "out")
    run = run_worker(python, replace(job, device="auto"), tmp_path / "jobs")
    assert [e["event"] for e in run.events] == ["started", "error"]
    error = run.of("error")[0]
    assert run.returncode == 1 and error["kind"] == "backend_unavailable"
    assert "CUDA" in error["message"] and "--backend gptqmodel" in error["hint"]


@pytest.mark.gpu
def test_auto_gptq_quantizes_on_cuda(micro_model: Path, tmp_path: Path) -> None:
    python = env_python("auto-gptq")
    job = replace(quantize_job("auto-gptq", "gptq", micro_model, tmp_path, "out"), device="cuda")
    run = run_worker(python, job, tmp_path / "jobs")
    assert run.result and [e["index"] for e in run.of("layer_done")] == list(range(LAYERS))
    check = run_worker(env_python("gptqmodel"), replace(validate_job(micro_model, job.output_dir), device="cuda"),
                       tmp_path / "validate")
    assert check.result["metadata"]["finite"] is True


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "fmt"), CASES)
def test_quantize_on_cuda(backend: str, fmt: str, micro_model: Path, tmp_path: Path) -> None:
    job = replace(quantize_job(backend, fmt, micro_model, tmp_path, "out"), device="cuda")
    run = run_worker(env_python(backend), job, tmp_path / "jobs")
    assert all(e["peak_gpu_bytes"] for e in run.of("layer_done") if not e["resumed"])
    assert run.result["metadata"]["device"] == "cuda"
