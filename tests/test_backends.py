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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from background import Lane, lane, selected
from conftest import MODELS, REPO, _missing
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
# reloaded and compared here without qwrap: autoawq's artifact; gptqmodel's AWQ and GPTQ are
# validated through `qwrap run` (test_arch_models.py: measured, and --no-eval in its kill test)
VALIDATED = [("autoawq", "awq")]
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
               kill_when: Callable[[dict[str, Any]], bool] | None = None,
               environ: Mapping[str, str] | None = None) -> Run:
    """Start a worker as the parent will (job file, event fd), optionally SIGKILL it when
    ``kill_when(event)`` first holds. ``environ``: the environment it extends (default: ours)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = p.write_job(job, workdir / f"job-{time.monotonic_ns()}.json")
    log = job_path.with_suffix(".log")
    read_fd, write_fd = os.pipe()
    env = {**(os.environ if environ is None else environ),
           "PYTHONPATH": str(REPO / "wrapper"), p.EVENT_FD_ENV: str(write_fd),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # One thread: these 2-core hosts are shared, and OpenMP spin-waits under contention.
           "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with log.open("wb") as out:
        # a session of its own, as qwrap starts its workers (the kernel's autogroups then weigh it
        # like any other session's process, not as a share of pytest's)
        proc = subprocess.Popen([str(python), "-m", p.worker_module(job), str(job_path)], env=env,
                                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
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
def micro_model(named_model: Callable[[str], Path]) -> Path:
    assert MODELS["micro-llama"] == TINY
    return named_model("micro-llama")


@dataclass(frozen=True)
class Quantized:
    job: p.QuantizeJob
    run: Run


@dataclass(frozen=True)
class Resumed:
    job: p.QuantizeJob  # the killed run's job
    killed: Run
    resumed: Run
    output: Path  # the resumed run's fresh output folder


class Runs:
    """The module's worker runs, started together on a lane of two (background.py): every worker
    runs one thread (OMP_NUM_THREADS=1) and spends seconds importing torch and its backend, so two
    keep both cores busy. Each test waits for the runs it asserts on."""

    def __init__(self, micro_model: Path, tmp: pytest.TempPathFactory, on: Lane) -> None:
        self.model, self.tmp, self.lane = micro_model, tmp, on

    def start(self, names: set[str]) -> None:
        """Every run the tests named in ``names`` read, in the order they read them (a run that
        waits for another is started after it, so the two workers never both wait)."""
        if names & {"test_quantize_end_to_end_and_validate", "test_killed_run_resumes_to_a_byte_identical_artifact"}:
            for case in CASES:
                self.lane.start(("quantized", *case), self._quantized, *case)
        if "test_quantize_end_to_end_and_validate" in names:
            for case in VALIDATED:
                self.lane.start(("validated", *case), self._validated, *case)
        if "test_killed_run_resumes_to_a_byte_identical_artifact" in names:
            for case in CASES:
                self.lane.start(("resumed", *case), self._resumed, *case)
        if "test_bad_group_size_fails_before_any_layer" in names:
            self.lane.start(("bad-group",), self._bad_group)
        if names & {"test_auto_gptq_env_imports_its_pinned_stack", "test_auto_gptq_refuses_on_cpu_before_loading_the_model"}:
            self.lane.start(("auto-gptq",), self._auto_gptq_probe)
        if "test_auto_gptq_refuses_on_cpu_before_loading_the_model" in names:
            self.lane.start(("auto-gptq-refusal",), self._auto_gptq_refusal)

    def get(self, *key: str) -> Any:
        return self.lane.result(*key)

    def _worker(self, python: Path, job: p.Job, workdir: Path, **kwargs: Any) -> Run:
        return run_worker(python, job, workdir, environ=self.lane.env, **kwargs)

    # -- the runs ------------------------------------------------------------------------

    def _quantized(self, backend: str, fmt: str) -> Quantized:
        """An uninterrupted, checkpointed run per (backend, format), shared by the tests."""
        python = env_python(backend)
        base = self.tmp.mktemp(f"{backend}-{fmt}")
        job = quantize_job(backend, fmt, self.model, base, "full")
        return Quantized(job, self._worker(python, job, base / "jobs"))

    def _validated(self, backend: str, fmt: str) -> Run:
        done: Quantized = self.get("quantized", backend, fmt)
        out = Path(done.job.output_dir)
        return self._worker(env_python("gptqmodel"), validate_job(self.model, str(out)), out.parent / "validate")

    def _resumed(self, backend: str, fmt: str) -> Resumed:
        python = env_python(backend)
        base = self.tmp.mktemp(f"killed-{backend}-{fmt}")
        job = quantize_job(backend, fmt, self.model, base, "first")
        killed = self._worker(python, job, base / "jobs", kill_when=lambda e: e["event"] == "layer_done")
        # The parent gives every attempt a fresh output folder; the checkpoints stay.
        (base / "second").mkdir()
        resumed = self._worker(python, replace(job, output_dir=str(base / "second")), base / "jobs")
        return Resumed(job, killed, resumed, base / "second")

    def _bad_group(self) -> Run:
        base = self.tmp.mktemp("bad-group")
        job = replace(quantize_job("gptqmodel", "gptq", self.model, base, "out"), group_size=96)
        return self._worker(env_python("gptqmodel"), job, base / "jobs")

    def _auto_gptq_probe(self) -> list[str]:
        """One process: the pinned stack's versions, and whether torch sees a CUDA device."""
        probe = self.lane.run(
            [str(env_python("auto-gptq")), "-c", "import auto_gptq, peft, datasets, transformers, torch; "
                                                 "print(auto_gptq.__version__, transformers.__version__, "
                                                 "torch.cuda.is_available())"], check=True)
        return probe.stdout.split()

    def _auto_gptq_refusal(self) -> Run | None:
        """None when a CUDA device is visible (auto-gptq does not refuse then)."""
        if self.get("auto-gptq")[-1] == "True":
            return None
        base = self.tmp.mktemp("auto-gptq-refusal")
        # A model path that does not exist: any attempt to load it would fail differently.
        job = quantize_job("auto-gptq", "gptq", base / "no-such-model", base, "out")
        return self._worker(env_python("auto-gptq"), replace(job, device="auto"), base / "jobs")


@pytest.fixture(scope="module")
def runs(micro_model: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Runs]:
    with lane(tmp_path_factory.mktemp("lane"), workers=2) as on:
        started = Runs(micro_model, tmp_path_factory, on)
        started.start(selected(request))
        yield started


@pytest.mark.parametrize(("backend", "fmt"), CASES)
def test_quantize_end_to_end_and_validate(backend: str, fmt: str, micro_model: Path, runs: Runs) -> None:
    done: Quantized = runs.get("quantized", backend, fmt)
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

    if (backend, fmt) not in VALIDATED:
        return
    check: Run = runs.get("validated", backend, fmt)
    stats = check.result["metadata"]
    assert stats["finite"] is True and stats["tokens"] == 4 * 64
    assert 0 <= stats["kl_divergence"] < 0.1, stats  # random weights: nearly uniform outputs
    assert stats["top1_agreement"] > 0.3, stats


@pytest.mark.parametrize(("backend", "fmt"), CASES)
def test_killed_run_resumes_to_a_byte_identical_artifact(backend: str, fmt: str, runs: Runs) -> None:
    reference: Quantized = runs.get("quantized", backend, fmt)
    assert reference.run.result
    done: Resumed = runs.get("resumed", backend, fmt)  # SIGKILLed at its first layer_done, then run again
    killed, resumed = done.killed, done.resumed
    assert killed.returncode == -signal.SIGKILL
    assert not killed.of("result")
    assert resumed.result
    assert [e["index"] for e in resumed.of("layer_done") if e["resumed"]] == [0]
    assert [e["index"] for e in resumed.of("layer_started")] == list(range(LAYERS) if backend == "autoawq"
                                                                   else range(1, LAYERS))
    assert resumed.result["metadata"]["calibration_cache_hit"] is True
    assert tree_bytes(done.output) == tree_bytes(Path(reference.job.output_dir))


def test_bad_group_size_fails_before_any_layer(runs: Runs) -> None:
    run: Run = runs.get("bad-group")  # gptqmodel, GPTQ with group size 96
    (error,) = run.of("error")
    assert run.returncode == 1 and error["kind"] == "unsupported"
    assert "group size 96" in error["message"] and not run.of("layer_started")


def test_auto_gptq_env_imports_its_pinned_stack(runs: Runs) -> None:
    assert runs.get("auto-gptq")[-3:-1] == ["0.7.1", "4.45.2"]  # imports auto_gptq, peft, datasets, transformers


def test_auto_gptq_refuses_on_cpu_before_loading_the_model(runs: Runs) -> None:
    run: Run | None = runs.get("auto-gptq-refusal")
    if run is None:
        pytest.skip("a CUDA device is visible: auto-gptq does not refuse here")
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
