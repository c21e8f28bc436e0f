"""Isolated, pinned Python environments for the converter and each quantization backend.

An environment lives in the cache under ``envs/<name>-<key>``, where the key hashes its
lock file, the Python version and the torch spec: editing a lock builds a new one.
It counts as installed only when its marker ``qwrap-env.json`` exists (written last,
through a staging name) **and** its health check imports pass. Leftovers of an unfinished
install are removed before building again.

torch is installed once per (version, CPU/CUDA) into a shared ``torch-*`` environment and
made visible to the others through a ``.pth`` file: it is the biggest download, every
backend pins the same version, and pip then treats it as already installed.

Offline (``QWRAP_WHEELHOUSE=DIR``, as on a lent GPU machine that reaches no package index):
an environment is the preinstalled Python (``QWRAP_BASE_PYTHON``, default ``python3``) and its
packages, torch included, seen through a ``.pth`` file, plus what ``DIR/<name>.txt`` lists,
installed from ``DIR`` alone (``--no-index --no-deps``; scripts/gpu-bundle makes the folder).
Packages installed into the environment come first on its path, so a pinned older version
(auto-gptq's transformers) wins over the preinstalled one. torch is never installed there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .children import run_checked
from .errors import StepFailedError, ToolchainMissingError
from .toolchain import cache_root, gpu_present, package_data
from .workers.backends import BACKENDS, DECLARED_BACKENDS

LOCK_DIR = package_data("locks")
TORCH_VERSION = os.environ.get("QWRAP_TORCH_VERSION", "2.13.0")
MARKER = "qwrap-env.json"
HEALTH_TIMEOUT_S = float(os.environ.get("QWRAP_HEALTH_TIMEOUT", "300"))


@dataclass(frozen=True)
class EnvSpec:
    name: str
    lock: str  # file name under locks/
    imports: tuple[str, ...]  # health check
    torch: bool = True
    packages: tuple[str, ...] = ()  # the lock's main pins, shown by `qwrap doctor`


# The converter's environment (GGUF conversion, calibration text), then every backend's, as
# workers/backends.py declares them (a new backend is a worker, its lock and a line there), then
# the report environment (matplotlib, no torch) that draws the quality plot.
SPECS: dict[str, EnvSpec] = {
    "convert": EnvSpec("convert", "convert.txt", ("torch", "transformers", "sentencepiece", "numpy"),
                       packages=("transformers", "numpy", "sentencepiece")),
    **{b.name: EnvSpec(b.name, b.lock, b.imports, packages=b.packages) for b in DECLARED_BACKENDS},
    "report": EnvSpec("report", "report.txt", ("matplotlib",), torch=False, packages=("matplotlib", "numpy")),
}


@dataclass(frozen=True)
class Env:
    name: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def holds(self, package: str) -> bool:
        """Whether ``package`` is installed in this environment: in its site-packages or in the
        shared ones its .pth files add (the torch environment, an offline base Python), from the
        files alone (no interpreter started)."""
        places = list(self.path.glob("lib/python*/site-packages"))
        for site in list(places):
            for pth in site.glob("*.pth"):
                try:
                    lines = pth.read_text().splitlines()
                except OSError:
                    continue
                places += [Path(x) for x in lines if x.strip() and not x.startswith(("#", "import"))]
        return any((p / package).is_dir() for p in places)


def spec(name: str) -> EnvSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ToolchainMissingError(
            f"unknown environment {name!r}", hint=f"Known: {', '.join(SPECS)}."
        ) from None


def torch_variant() -> str:
    return "cuda" if gpu_present() else "cpu"


def env_key(s: EnvSpec) -> str:
    try:
        lock = (LOCK_DIR / s.lock).read_bytes()
    except FileNotFoundError:
        raise ToolchainMissingError(f"no lock file {LOCK_DIR / s.lock} for environment {s.name}") from None
    parts = [lock, sys.version.split()[0].encode(), TORCH_VERSION.encode(), torch_variant().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def env_path(name: str) -> Path:
    s = spec(name)
    return cache_root() / "envs" / f"{s.name}-{env_key(s)}"


def _torch_env_path() -> Path:
    return cache_root() / "envs" / f"torch-{TORCH_VERSION}-{torch_variant()}-py{sys.version_info[0]}{sys.version_info[1]}"


def _check(python: Path, imports: tuple[str, ...], log: Path) -> bool:
    """The health check: True if the imports work. A check that does not finish in time
    (a loaded host, a slow network filesystem) raises instead of condemning the environment:
    deleting and rebuilding a healthy environment would cost minutes for nothing."""
    code: str = "import " + ", ".join(imports)
    if torch_variant() == "cpu" and "torch" in imports:
        # Never a CUDA torch on a CPU-only host: it is several GB and useless here.
        code += "\nimport torch; assert torch.version.cuda is None, 'CUDA torch on a CPU-only host'"
    argv: list[str | os.PathLike[str]] = [python, "-c", code]
    try:
        run_checked(argv, what=f"the health check of {python.parent.parent.name}", log_path=log,
                    timeout=HEALTH_TIMEOUT_S)
    except StepFailedError:
        return False
    return True


def healthy(env: Env, s: EnvSpec, log: Path) -> bool:
    return (env.path / MARKER).is_file() and env.python.exists() and _check(env.python, s.imports, log)


def _pip(python: Path, args: list[str], log: Path, on_line: Callable[[str], None] | None) -> None:
    cmd: list[str | os.PathLike[str]] = [python, "-m", "pip", "install", "--disable-pip-version-check", *args]
    try:
        run_checked(cmd, what=f"installing into {python.parent.parent}", log_path=log, on_line=on_line)
    except StepFailedError as exc:
        raise ToolchainMissingError(
            exc.message, hint=f"Full log: {log}. Fix the cause (network to the package index?) and run again.",
            log_path=str(log),
        ) from None


def _venv(path: Path, log: Path) -> None:
    try:
        run_checked([sys.executable, "-m", "venv", path], what=f"python -m venv {path}", log_path=log)
    except StepFailedError as exc:
        raise ToolchainMissingError(exc.message, hint=f"See {log}.", log_path=str(log)) from None


def _write_marker(path: Path, data: dict[str, str]) -> None:
    staging = path / (MARKER + ".tmp")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path / MARKER)


def _site_packages(env_dir: Path) -> Path:
    return env_dir / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _ensure_torch(log: Path, on_line: Callable[[str], None] | None) -> Path:
    """The shared torch environment; returns its site-packages."""
    path = _torch_env_path()
    torch_env = Env("torch", path)
    if healthy(torch_env, EnvSpec("torch", "", ("torch",)), log):
        return _site_packages(path)
    shutil.rmtree(path, ignore_errors=True)
    _venv(path, log)
    extra = os.environ.get("QWRAP_TORCH_INDEX_URL")  # e.g. a CPU-only wheel index
    _pip(torch_env.python, [f"torch=={TORCH_VERSION}", *(["--index-url", extra] if extra else [])], log, on_line)
    _write_marker(path, {"torch": TORCH_VERSION, "variant": torch_variant()})
    return _site_packages(path)


def wheelhouse() -> Path | None:
    """The offline wheel folder (QWRAP_WHEELHOUSE), when environments are made without an index."""
    folder = os.environ.get("QWRAP_WHEELHOUSE")
    return Path(folder).resolve() if folder else None


def _offline_env(env: Env, s: EnvSpec, wheels: Path, log: Path, on_line: Callable[[str], None] | None) -> None:
    """The preinstalled Python's packages through a .pth file, plus the wheelhouse's list for
    this environment, installed without an index."""
    base = os.environ.get("QWRAP_BASE_PYTHON") or shutil.which("python3") or sys.executable
    try:
        # every package folder on its path, those its own .pth files add (a shared torch) included
        code = "import sys; print('\\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))"
        site = "\n".join(run_checked([base, "-c", code], what=f"{base} (site-packages)", log_path=log).tail)
        run_checked([base, "-m", "venv", "--without-pip", env.path], what=f"python -m venv {env.path}", log_path=log)
    except StepFailedError as exc:
        raise ToolchainMissingError(exc.message, hint=f"See {log}.", log_path=str(log)) from None
    ours = run_checked([env.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       what="the new environment", log_path=log).tail[-1].strip()
    Path(ours).mkdir(parents=True, exist_ok=True)
    (Path(ours) / "_qwrap_base_site.pth").write_text(site.strip() + "\n")
    listed = wheels / f"{s.name}.txt"
    if not listed.is_file() or not any(ln.strip() and not ln.startswith("#") for ln in listed.read_text().splitlines()):
        return
    offline = ["--no-index", "--no-deps", "--find-links", str(wheels), "--target", ours]
    if (wheels / "build.txt").is_file():  # the build backend the carried source archives need, first
        _pip(env.python, [*offline, "-r", str(wheels / "build.txt")], log, on_line)
    _pip(env.python, [*offline, "--no-build-isolation", "-r", str(listed)], log, on_line)


def ensure_env(name: str, *, on_line: Callable[[str], None] | None = None, rebuild: bool = False) -> Env:
    """Return a healthy environment ``name``, creating it (with progress lines) if needed."""
    s = spec(name)
    env = Env(name, env_path(name))
    log = cache_root() / "envs" / "logs" / f"{env.path.name}.log"
    if not rebuild and healthy(env, s, log):
        return env
    shutil.rmtree(env.path, ignore_errors=True)  # leftovers of an unfinished install
    env.path.parent.mkdir(parents=True, exist_ok=True)
    wheels = wheelhouse()
    if wheels is not None:
        _offline_env(env, s, wheels, log, on_line)
        if not _check(env.python, s.imports, log):
            raise ToolchainMissingError(f"environment {name} was made offline from {wheels} but its health check failed",
                                        hint=f"See {log}; scripts/gpu-bundle lists what the environment needs.")
        _write_marker(env.path, {"name": name, "key": env_key(s), "torch": TORCH_VERSION, "offline": str(wheels)})
        return env
    _venv(env.path, log)
    constraints = env.path / "qwrap-constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    if s.torch:
        shared = _ensure_torch(log, on_line)
        (_site_packages(env.path) / "_qwrap_shared_torch.pth").write_text(f"{shared}\n")
    lock = env.path / "qwrap-lock.txt"  # the lock as installed (package data may not be a plain file)
    lock.write_bytes((LOCK_DIR / s.lock).read_bytes())
    _pip(env.python, ["-r", str(lock), "-c", str(constraints)], log, on_line)
    if not _check(env.python, s.imports, log):
        raise ToolchainMissingError(
            f"environment {name} was installed but its health check failed", hint=f"See {log}."
        )
    _write_marker(env.path, {"name": name, "key": env_key(s), "torch": TORCH_VERSION})
    return env


KEY_PACKAGES = tuple(dict.fromkeys(pkg for s in SPECS.values() for pkg in s.packages))


def pinned(name: str) -> dict[str, str]:
    """The main packages an environment's lock pins (and the shared torch, where it has it)."""
    s = spec(name)
    found = {"torch": TORCH_VERSION} if s.torch else {}
    for line in (LOCK_DIR / s.lock).read_text().splitlines():
        pkg, _, version = line.partition("==")
        key = pkg.strip().lower().replace("_", "-")
        if key in KEY_PACKAGES and version:
            found[key] = version.strip()
    return found


def find_env(name: str) -> Env:
    """An existing environment (its marker says it passed its health check), or a clear
    error saying how to create it."""
    spec(name)
    env = Env(name, env_path(name))
    if not (env.path / MARKER).is_file():
        raise ToolchainMissingError(
            f"the {name} environment is not created yet ({env.path})",
            hint=f"Run `{setup_command([name])}`.",
        )
    return env


def worker_code() -> Path:
    """The folder to put on a worker's PYTHONPATH: only qwrap's worker code (``qwrap/__init__.py``
    and ``qwrap/workers/``), copied from the installed package into the cache and keyed by its
    content. Never the parent's own site-packages, whose typer/huggingface_hub would shadow an
    environment's pins; and no source checkout needed."""
    pkg = package_data()
    blobs = {"__init__.py": (pkg / "__init__.py").read_bytes()}
    blobs |= {f"workers/{t.name}": t.read_bytes() for t in (pkg / "workers").iterdir() if t.name.endswith(".py")}
    digest = hashlib.sha256()
    for name in sorted(blobs):
        digest.update(name.encode() + b"\0" + hashlib.sha256(blobs[name]).digest())
    root = cache_root() / "code" / f"qwrap-{__version__}-{digest.hexdigest()[:12]}"
    if (root / "qwrap" / "workers" / "protocol.py").is_file():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=root.parent))
    except OSError as exc:
        raise ToolchainMissingError(f"cannot stage qwrap's worker code in {root.parent}: {exc.strerror}",
                                    hint="Make the cache writable, or point QWRAP_CACHE_DIR at a writable folder.") from exc
    for name, data in blobs.items():
        (stage / "qwrap" / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / "qwrap" / name).write_bytes(data)
    try:
        os.replace(stage, root)
    except OSError:  # another qwrap staged the same code first
        shutil.rmtree(stage, ignore_errors=True)
    return root


def setup_command(missing: list[str], *, llama: bool = True) -> str:
    """The one `qwrap setup` command that creates the environments ``missing`` (and whatever
    else is missing: setup reuses what is there)."""
    backends = [n for n in missing if n in BACKENDS]
    return " ".join(["qwrap setup", *([] if llama else ["--no-llama"]), *(f"--backends {b}" for b in backends)])
