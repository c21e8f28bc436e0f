"""Shared fixtures: the real toolchain, real tiny models built offline, qwrap as a real
subprocess, and guards that fail a test writing to $HOME or the real cache by accident."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from qwrap import envs  # noqa: E402
from qwrap.errors import ToolchainMissingError  # noqa: E402
from qwrap.journal import Journal  # noqa: E402
from qwrap.toolchain import Toolchain, cache_root, find_toolchain  # noqa: E402

REQUIRE = os.environ.get("QWRAP_REQUIRE_TOOLCHAIN") == "1" or os.environ.get("CI") == "true"

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
        new = _listing(path) - names - {"logs", ".pytest_cache", "calibration", "test-models", "code"}
        assert not new, f"test wrote {sorted(new)} into {path}"


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
    subprocess.run(
        [str(python), str(REPO / "scripts" / "make-tiny-model"), str(out), *args],
        check=True, capture_output=True, text=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, convert_python: Path) -> Path:
    """A 2-layer Llama (hidden 256, vocab 4096, bf16, SentencePiece tokenizer)."""
    return make_model(convert_python, tmp_path_factory.mktemp("models") / "tiny-llama")


# The default tiny preset trained on the corpus: ~80 s on one core, held-out loss 8.36 -> 4.36,
# a clean KLD ladder Q8_0 < Q6_K < Q5_K_M < Q4_K_M < Q3_K_M < Q2_K (scripts/make-tiny-model --help).
TRAINED_MODEL_ARGS = ("--train-steps", "300")


def trained_model_key(python: Path, args: tuple[str, ...] = TRAINED_MODEL_ARGS) -> str:
    """What the trained weights depend on: the builder, the corpus, the flags and the
    converter environment (its torch) that runs the builder."""
    digest = hashlib.sha256()
    for part in ((REPO / "scripts" / "make-tiny-model").read_bytes(),
                 (REPO / "tests" / "data" / "corpus.txt").read_bytes(),
                 "\0".join(args).encode(), str(python).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_model(convert_python: Path) -> Path:
    """The 2-layer tiny Llama of `tiny_model`, trained with TRAINED_MODEL_ARGS; built once per
    machine into cache_root()/test-models/trained-KEY (KEY: trained_model_key)."""
    key = trained_model_key(convert_python)
    root = cache_root() / "test-models"
    final = root / f"trained-{key}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".trained-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session may be building the same key
        if final.is_dir():
            return final
        for stale in root.glob(f".trained-{key}-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".trained-{key}-", dir=root) as tmp:
            built = Path(tmp) / "model"
            proc = subprocess.run(
                [str(convert_python), str(REPO / "scripts" / "make-tiny-model"), str(built),
                 *TRAINED_MODEL_ARGS],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
            if proc.returncode:
                pytest.fail(f"make-tiny-model {' '.join(TRAINED_MODEL_ARGS)} failed:\n"
                            f"{proc.stderr[-3000:]}", pytrace=False)
            built.rename(final)  # atomic: a killed build never leaves a half model here
    return final


@pytest.fixture(scope="session")
def corpus() -> Path:
    return REPO / "tests" / "data" / "corpus.txt"


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
