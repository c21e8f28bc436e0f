"""Shared fixtures: the real toolchain, real tiny models built offline, qwrap as a real
subprocess, and guards that fail a test writing to $HOME or the real cache by accident."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from background import Lane, lane, prefetch, prefetched, shared, start_prefetching  # noqa: E402
from qwrap import envs  # noqa: E402
from qwrap.errors import ToolchainMissingError  # noqa: E402
from qwrap.journal import Journal, sha256_file  # noqa: E402
from qwrap.toolchain import Toolchain, cache_root, find_toolchain  # noqa: E402

REQUIRE = os.environ.get("QWRAP_REQUIRE_TOOLCHAIN") == "1" or os.environ.get("CI") == "true"
# Every run computes its own calibration statistics (importance matrix, sensitivity), as on a
# fresh machine: a test that kills a run at llama-imatrix must find llama-imatrix running. The
# tests of the reuse point QWRAP_STATS_DIR at a folder of their own.
os.environ["QWRAP_STATS_DIR"] = "none"

try:  # for tests that run the converter's Python directly
    os.environ.setdefault("QWRAP_CONVERT_PYTHON", str(envs.find_env("convert").python))
except ToolchainMissingError:
    pass


def _missing(what: str, fix: str) -> None:
    msg = f"{what} is not set up ({fix})"
    if REQUIRE:
        pytest.fail(msg + " - required under make test / CI", pytrace=False)
    pytest.skip(msg)


# -- guards ---------------------------------------------------------------------------


def _listing(path: Path) -> set[str]:
    try:
        return {p.name for p in path.iterdir()}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def _guard_home_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hub downloads go to a temp HF_HOME; nothing new may appear in $HOME or the cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # Tests never reach the real Hub (huggingface_hub would retry for ~25 s before failing);
    # tests that measure quality pass --eval-text, tests of the Hub client run a local server.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    watched = [Path.home(), Path.home() / ".cache", cache_root(), cache_root() / "envs"]
    before = {p: _listing(p) for p in watched}
    yield
    for path, names in before.items():
        new = _listing(path) - names - {"logs", ".pytest_cache", "calibration", "test-models", "code", "tensors"}
        assert not new, f"test wrote {sorted(new)} into {path}"


@pytest.fixture(scope="session", autouse=True)
def session_lane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's second lane: the slowest independent runs the modules register with
    background.prefetch, started as the session starts (see background.py). (Not at a lower
    priority: the pinned llama-perplexity loses its last lines when its logging thread is kept
    waiting, and qwrap's children each run in a session of their own, which the kernel's
    autogroups weigh alike whatever their niceness.)"""
    root = tmp_path_factory.mktemp("session-lane")
    with lane(root) as on:
        start_prefetching(request, on, root)
        yield


# -- toolchain --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    try:
        return find_toolchain()
    except ToolchainMissingError:
        _missing("the pinned llama.cpp build", "run `make llama`")
        raise


@pytest.fixture(scope="session")
def convert_python() -> Path:
    try:
        python = envs.find_env("convert").python
    except ToolchainMissingError:
        _missing("the converter environment", "run `make envs`")
        raise
    os.environ["QWRAP_CONVERT_PYTHON"] = str(python)
    return python


def make_model(python: Path, out: Path, *args: str) -> Path:
    proc = subprocess.run(
        [str(python), str(REPO / "scripts" / "make-tiny-model"), str(out), *args],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800,
    )
    if proc.returncode:
        pytest.fail(f"make-tiny-model {' '.join(args)} failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return out


def model_key(python: Path, args: tuple[str, ...]) -> str:
    """What a built model depends on: the builder, the corpus (its tokenizer is trained on it,
    and so are trained weights), the flags and the converter environment (its torch) that runs
    the builder."""
    digest = hashlib.sha256()
    for part in ((REPO / "scripts" / "make-tiny-model").read_bytes(),
                 (REPO / "tests" / "data" / "corpus.txt").read_bytes(),
                 "\0".join(args).encode(), str(python).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def built_model(python: Path, final: Path, args: tuple[str, ...]) -> Path:
    """``final``, built by make-tiny-model with ``args`` unless it is already there."""
    return built_once(final, lambda out: make_model(python, out, *args))


def built_by_script(python: Path, final: Path, script: str, *args: Path) -> Path:
    """``final``, built unless it is already there by ``python -c script ARGS... FOLDER`` (a
    model of a layout make-tiny-model does not make: a tokenizer from a vocab-only GGUF, an MoE,
    a vision-language model)."""
    def build(out: Path) -> None:
        proc = subprocess.run([str(python), "-c", script, *map(str, args), str(out)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=1800)
        if proc.returncode:
            pytest.fail(f"building {final.name} failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return built_once(final, build)


def built_once(final: Path, build: Callable[[Path], object]) -> Path:
    """``final`` unless it is already there, else ``build(folder)``: into a temporary folder
    beside it, then renamed (atomic: a killed build never leaves a half model), under a lock (a
    concurrent session may be building the same one)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        for stale in final.parent.glob(f".{final.name}-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{final.name}-", dir=final.parent) as tmp:
            build(Path(tmp) / "model")
            (Path(tmp) / "model").rename(final)
    return final


# Every test model, by name: make-tiny-model's arguments. Each is built once per machine into
# cache_root()/test-models/random-KEY/NAME (the folder's name names the artifacts) and shared by
# every test that reads it; a test that changes a model changes a copy.
MODELS: dict[str, tuple[str, ...]] = {
    "tiny-llama": (),  # 2 layers, hidden 256, vocab 4096, bf16, SentencePiece tokenizer
    "llama-bpe": ("--tokenizer", "llama-bpe"),
    "gpt2-bpe": ("--tokenizer", "gpt2-bpe"),  # the converter rejects its pre-tokenizer
    "qwen2-sharded": ("--arch", "qwen2", "--shards", "2"),
    "foo": ("--architecture-name", "FooForCausalLM"),  # an architecture the converter does not support
    # ~60M parameters: each tool runs for seconds, long enough to catch it running
    "medium": ("--hidden", "1024", "--ffn", "2816", "--layers", "4", "--heads", "8", "--kv-heads", "4"),
    # test_backends' TINY: 3 layers, hidden 128, vocab 512 (the workers' own tests)
    "micro-llama": ("--layers", "3", "--hidden", "128", "--ffn", "256", "--heads", "2", "--kv-heads", "2",
                    "--vocab", "512"),
}


@pytest.fixture(scope="session")
def named_model(convert_python: Path) -> Callable[[str], Path]:
    """``named_model(NAME)``: the model MODELS[NAME], built once per machine."""

    def get(name: str) -> Path:
        args = MODELS[name]
        return built_model(convert_python,
                           cache_root() / "test-models" / f"random-{model_key(convert_python, args)}" / name, args)

    return get


@pytest.fixture(scope="session")
def tiny_model(named_model: Callable[[str], Path]) -> Path:
    """A 2-layer Llama (hidden 256, vocab 4096, bf16, SentencePiece tokenizer)."""
    return named_model("tiny-llama")


# The default tiny preset trained on the corpus: ~80 s on one core, held-out loss 8.36 -> 4.36,
# a clean KLD ladder Q8_0 < Q6_K < Q5_K_M < Q4_K_M < Q3_K_M < Q2_K (scripts/make-tiny-model --help).
TRAINED_MODEL_ARGS = ("--train-steps", "300")


def trained_model_key(python: Path, args: tuple[str, ...] = TRAINED_MODEL_ARGS) -> str:
    return model_key(python, args)


@pytest.fixture(scope="session")
def trained_model(convert_python: Path) -> Path:
    """The 2-layer tiny Llama of `tiny_model`, trained with TRAINED_MODEL_ARGS; built once per
    machine into cache_root()/test-models/trained-KEY (KEY: trained_model_key)."""
    key = trained_model_key(convert_python)
    return built_model(convert_python, cache_root() / "test-models" / f"trained-{key}", TRAINED_MODEL_ARGS)


@pytest.fixture(scope="session")
def corpus() -> Path:
    return REPO / "tests" / "data" / "corpus.txt"


def calibration_sample(corpus: Path, out: Path, chars: int) -> Path:
    """``out``: the corpus' first whole documents, about ``chars`` characters (~4 a token), as
    calibration text for a run that needs an importance matrix but is not about its quality:
    llama-imatrix reads its whole text (up to 128 chunks of 512 tokens), and the whole corpus
    (~62k tokens) costs seconds of both cores a run."""
    text = corpus.read_text(encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text[:text.rfind("\n\n", 0, chars)].strip() + "\n", encoding="utf-8")
    return out


# -- qwrap as a real process --------------------------------------------------------------


def qwrap_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwrap.cli", *args]


def run_qwrap(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    if env and "HF_ENDPOINT" in env and "HF_HUB_OFFLINE" not in env:
        full_env.pop("HF_HUB_OFFLINE", None)  # a test Hub server is reachable
    return subprocess.run(
        qwrap_argv(*args), capture_output=True, text=True, env=full_env, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- GPU tests ----------------------------------------------------------------------------


def cuda_devices() -> list[str]:
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    proc = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if line.startswith("GPU")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not cuda_devices():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: nvidia-smi finds none (scripts/gpu-check runs these on a GPU host)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def intervals(out: Path) -> dict[str, tuple[float, float]]:
    """Each step's [started, finished] from the journal's timestamps."""
    spans: dict[str, list[float]] = {}
    for rec in Journal(out).records():
        if "step" in rec and rec["state"] in ("started", "done"):
            spans.setdefault(rec["step"], []).append(rec["t"])
    return {step: (times[0], times[-1]) for step, times in spans.items()}


def overlapping(spans: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    names = sorted(spans)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]


# -- end-to-end runs shared by the tests that read them ---------------------------------------
# A test that changes such a run's folder works on a copy; rerunning in it is fine.


@dataclass(frozen=True)
class Run:
    out: Path
    result: dict[str, Any]  # its --json
    stderr: str = ""
    events: Path | None = None

    def shas(self) -> dict[str, str]:
        return {a["quant"]: a["sha256"] for a in self.result["artifacts"]}


def _gguf_run(tiny_model: Path, _: Toolchain, on: Lane, root: Path) -> Run:
    out, events = root / "out", root / "events.ndjson"
    proc = on.qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "-q", "q8_0", "--json",
                    "--events", str(events))
    assert proc.returncode == 0, proc.stderr
    return Run(out, json.loads(proc.stdout), proc.stderr, events)


prefetch(None, "gguf_run", _gguf_run, ("tiny_model", "toolchain"), fixture="gguf_run")


@pytest.fixture(scope="session")
def gguf_run(request: pytest.FixtureRequest) -> Run:
    """The tiny model to Q4_K_M and Q8_0, every other option at its default (offline, no
    evaluation text: no evaluation), with its NDJSON events. (On the session's lane: background.py.)"""
    return prefetched(request, "gguf_run")


def scaleout_options(corpus: Path) -> list[str]:
    """Two types with a small evaluation: every kind of GGUF step, in a few seconds each."""
    return ["-q", "Q4_K_M", "-q", "Q8_0", "--eval-text", str(corpus), "--eval-tokens", "1024", "--eval-ctx", "256",
            "--eval-weights", "on"]


SCALEOUT_ARTIFACTS = ("tiny-llama-Q4_K_M.gguf", "tiny-llama-Q8_0.gguf")


def artifact_shas(out: Path) -> dict[str, str]:
    return {name: sha256_file(out / name) for name in SCALEOUT_ARTIFACTS}


def scaleout_reference_run(run: Callable[..., subprocess.CompletedProcess[str]], tiny_model: Path, corpus: Path,
                           out: Path) -> dict[str, str]:
    proc = run("run", str(tiny_model), "-o", str(out), *scaleout_options(corpus))
    assert proc.returncode == 0, proc.stderr
    return artifact_shas(out)


@pytest.fixture(scope="session")
def scaleout_reference(tiny_model: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory,
                       toolchain: Toolchain) -> dict[str, str]:
    """The artifacts one uninterrupted run of scaleout_options makes (test_scaleout, test_slurm;
    test_scaleout starts it early on its lane: background.py)."""
    return shared("scaleout_reference", lambda: scaleout_reference_run(
        run_qwrap, tiny_model, corpus, tmp_path_factory.mktemp("scaleout-reference") / "o"))


@dataclass(frozen=True)
class PlannedRun:
    out: Path
    options: tuple[str, ...]
    plan: dict[str, Any]  # `qwrap plan --json` before the run (OUT did not exist)
    result: dict[str, Any]  # the run's --json
    plan_after: dict[str, Any]  # `qwrap plan --json` once the run has happened


def _imatrix_run(tiny_model: Path, corpus: Path, _: Toolchain, on: Lane, root: Path) -> PlannedRun:
    out = root / "o"
    calib = calibration_sample(corpus, root / "texts" / "calibration.txt", 8000)  # ~2,000 tokens
    options = ("-q", "Q4_K_M", "-q", "Q8_0", "-q", "IQ2_XS", "--imatrix", "auto", "--calib", str(calib))
    planned = on.qwrap("plan", str(tiny_model), "-o", str(out), *options, "--json")
    assert planned.returncode == 0, planned.stderr
    assert not out.exists(), "plan must not write"
    ran = on.qwrap("run", str(tiny_model), "-o", str(out), *options, "--json")
    assert ran.returncode == 0, ran.stderr
    again = on.qwrap("plan", str(tiny_model), "-o", str(out), *options, "--json")
    assert again.returncode == 0, again.stderr
    return PlannedRun(out, options, json.loads(planned.stdout), json.loads(ran.stdout), json.loads(again.stdout))


prefetch(None, "imatrix_run", _imatrix_run, ("tiny_model", "corpus", "toolchain"), fixture="imatrix_run")


@pytest.fixture(scope="session")
def imatrix_run(request: pytest.FixtureRequest) -> PlannedRun:
    """The tiny model to Q4_K_M, Q8_0 and IQ2_XS with an importance matrix computed from the
    corpus' first documents (``--calib`` in its options), planned before and after. (On the
    session's lane: background.py.)"""
    return prefetched(request, "imatrix_run")
