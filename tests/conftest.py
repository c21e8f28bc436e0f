"""Shared fixtures: the real toolchain, real tiny models built offline, qwrap as a real
subprocess, and guards that fail a test writing to $HOME or the real cache by accident."""

from __future__ import annotations

import os
import subprocess
import sys
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
        new = _listing(path) - names - {"logs", ".pytest_cache", "calibration"}
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
