"""qwrap as a user installs it: a wheel built by the standard backend from a copy of the
tracked files, installed into a fresh venv outside the checkout, and run from another folder
against the already-built cache (the same pins give the same cache keys, so nothing is rebuilt)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from background import Lane, folder, prefetch, prefetched, shared
from conftest import REPO, _missing
from qwrap import __version__, envs
from qwrap.errors import ToolchainMissingError
from qwrap.toolchain import Toolchain, read_pin

pytestmark = pytest.mark.slow


def _tracked(root: Path) -> list[str]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name and os.path.lexists(root / name)]


def _built_and_installed(on: Lane, tmp: Path) -> tuple[Path, Path]:
    """The wheel, built from a clean copy (as a fresh clone would be), so the checkout gets no
    build/ or egg-info; and a fresh venv outside the checkout it is installed into."""
    src = folder(tmp / "clone")
    for name in _tracked(REPO):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name, follow_symlinks=False)
    dist = folder(tmp / "dist")
    proc = on.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "deprecated" not in proc.stdout + proc.stderr
    (found,) = dist.glob("qwrap-*.whl")
    return found, _installed(on, found, tmp / "user" / "venv")


prefetch(__name__, "wheel.installed", _built_and_installed)  # on the session's lane (background.py)


@pytest.fixture(scope="module")
def wheel(request: pytest.FixtureRequest) -> Path:
    return prefetched(request, "wheel.installed")[0]


def test_wheel_holds_the_package_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"qwrap-{__version__}.dist-info/"
    assert all(n.startswith(("qwrap/", dist_info)) for n in names), [n for n in names if not n.startswith("qwrap")]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "egg-info" in n or "tests/" in n]
    package = REPO / "wrapper" / "qwrap"
    shipped = {n.removeprefix("qwrap/") for n in names if n.startswith("qwrap/")}
    tracked = {n.removeprefix("wrapper/qwrap/") for n in _tracked(REPO) if n.startswith("wrapper/qwrap/")}
    assert shipped == tracked, (shipped ^ tracked)
    assert {"locks/llama.cpp.lock", "workers/protocol.py", *(f"locks/{s.lock}" for s in envs.SPECS.values())} <= shipped
    assert (package / "locks" / "llama.cpp.lock").read_bytes() == zipfile.ZipFile(wheel).read("qwrap/locks/llama.cpp.lock")
    meta = zipfile.ZipFile(wheel).read(dist_info + "METADATA").decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires and not [r for r in requires if "torch" in r or "transformers" in r]


def _installed(on: Lane, wheel: Path, venv: Path) -> Path:
    on.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-cache-dir: nothing written to ~/.cache/pip (the guard fixture watches ~/.cache)
    proc = on.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
                   str(wheel)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = on.run([str(venv / "bin" / "pip"), "list", "--format=json"], check=True).stdout
    packages = {p["name"].lower() for p in json.loads(listed)}
    assert "qwrap" in packages and not packages & {"torch", "transformers", "numpy"}, packages
    return venv


@pytest.fixture(scope="module")
def installed(request: pytest.FixtureRequest) -> Path:
    return prefetched(request, "wheel.installed")[1]


def user(venv: Path, *args: str, cwd: Path, timeout: float = 600,
         environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, from a folder that is not the checkout, with nothing
    pointing back at the checkout (in ``environ``, default ours)."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if k not in ("PYTHONPATH", "QWRAP_LLAMA_LOCK", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "qwrap"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _run_by_the_user(tiny_model: Path, corpus: Path, on: Lane, tmp: Path) -> subprocess.CompletedProcess[str]:
    """One run of the installed wheel from a folder outside the checkout, both kinds of work:
    llama.cpp tools and a backend worker (its PYTHONPATH holds only qwrap's worker code). On
    the session's lane after the wheel's own work (background.py), one thread a tool."""
    venv = shared("wheel.installed", lambda: _built_and_installed(on, folder(tmp / "wheel")))[1]
    return user(venv, "run", str(tiny_model), "-o", str(tmp / "out"), "-f", "gguf", "-q", "Q8_0", "-f", "gptq",
                "--calib", str(corpus), "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval", "--threads", "1",
                "--json", cwd=folder(tmp / "elsewhere"), environ=on.env)


prefetch(__name__, "wheel.run", _run_by_the_user, ("tiny_model", "corpus"),
         tests=("test_installed_wheel_runs_outside_the_checkout",))


def test_installed_wheel_runs_outside_the_checkout(installed: Path, tmp_path: Path, toolchain: Toolchain,
                                                   request: pytest.FixtureRequest) -> None:
    try:
        gptqmodel = envs.find_env("gptqmodel")
    except ToolchainMissingError:
        _missing("the gptqmodel environment", "run `qwrap setup --backends gptqmodel`")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import qwrap; print(qwrap.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed)), where

    version = user(installed, "--version", cwd=elsewhere)
    assert version.returncode == 0, version.stderr
    assert __version__ in version.stdout and read_pin().commit[:12] in version.stdout

    setup = user(installed, "setup", "--no-envs", cwd=elsewhere)  # the cache's build, found up to date
    assert setup.returncode == 0 and setup.stdout.strip() == f"llama.cpp\t{toolchain.bin_dir.parent}", setup.stderr

    doctor = user(installed, "doctor", "--json", cwd=elsewhere)
    assert doctor.returncode == 0, doctor.stderr
    info = json.loads(doctor.stdout)
    assert info["llama_cpp"]["ok"] and info["llama_cpp"]["bin_dir"] == str(toolchain.bin_dir)
    # the same pins give the same cache keys: the installed wheel finds the checkout's environments
    assert info["environments"]["convert"]["path"] == str(envs.env_path("convert"))
    assert info["environments"]["gptqmodel"]["path"] == str(gptqmodel.path)

    # one run, both kinds: llama.cpp tools and a backend worker (its PYTHONPATH holds only qwrap's worker code)
    proc = prefetched(request, "wheel.run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifacts = json.loads(proc.stdout)["artifacts"]
    assert sorted(a["format"] for a in artifacts) == ["gguf", "gptq"]
    assert all(a["validated"] and Path(a["path"]).exists() for a in artifacts), artifacts
