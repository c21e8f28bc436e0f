"""Find the pinned llama.cpp build and converter; explain exactly what is missing.

Lookup order for the binaries: the qwrap cache (built by ``qwrap setup`` for the pin in the
package data file ``locks/llama.cpp.lock``), then ``$QWRAP_LLAMA_CPP_DIR`` (a folder holding the tools,
directly or under ``bin/``), then ``PATH``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from .errors import ToolchainMissingError

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-simple", "llama-mtmd-cli")
SETUP_HINT = "Run `qwrap setup` (fetches and builds the pinned llama.cpp into the cache; `make llama` does the same)."


def cache_root() -> Path:
    """$QWRAP_CACHE_DIR, else $XDG_CACHE_HOME/qwrap, else ~/.cache/qwrap (as scripts/cache-dir)."""
    if os.environ.get("QWRAP_CACHE_DIR"):
        return Path(os.environ["QWRAP_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "qwrap"
    return Path.home() / ".cache" / "qwrap"


def stats_dir() -> Path | None:
    """Where calibration statistics are kept between runs and output folders (importance
    matrices, sensitivities, keyed by their steps' fingerprints): $QWRAP_STATS_DIR, else the
    cache's stats/; None (keep nothing, compute every time) when $QWRAP_STATS_DIR is "none"."""
    value = os.environ.get("QWRAP_STATS_DIR")
    if value and value.lower() == "none":
        return None
    return Path(value) if value else cache_root() / "stats"


@dataclass(frozen=True)
class Pin:
    commit: str
    archive_file: str
    archive_sha256: str
    archive_version: str
    archive_package: str = ""
    archive_subdir: str = ""

    @property
    def short(self) -> str:
        return self.commit[:12]


def package_data(*parts: str) -> Traversable:
    """A file shipped inside the qwrap package (locks, the pin), wherever qwrap is installed."""
    return resources.files("qwrap").joinpath(*parts)


def lock_path() -> Path | Traversable:
    override = os.environ.get("QWRAP_LLAMA_LOCK")
    return Path(override) if override else package_data("locks", "llama.cpp.lock")


def read_pin(path: Path | Traversable | None = None) -> Pin:
    path = path or lock_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ToolchainMissingError(f"cannot read the llama.cpp pin {path}: {exc.strerror}") from exc
    values = dict(re.findall(r"^([A-Z_0-9]+)=(\S+)$", text, re.MULTILINE))
    return Pin(
        commit=values.get("LLAMA_CPP_COMMIT", "unknown"),
        archive_file=values.get("ARCHIVE_FILE", ""),
        archive_sha256=values.get("ARCHIVE_SHA256", ""),
        archive_version=values.get("ARCHIVE_VERSION", ""),
        archive_package=values.get("ARCHIVE_PACKAGE", ""),
        archive_subdir=values.get("ARCHIVE_SUBDIR", ""),
    )


@dataclass(frozen=True)
class Toolchain:
    bin_dir: Path
    source_dir: Path | None  # the llama.cpp tree holding convert_hf_to_gguf.py
    commit: str
    variant: str  # cpu | cuda | unknown
    origin: str  # cache | QWRAP_LLAMA_CPP_DIR | PATH

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainMissingError(f"{name} is missing from {self.bin_dir}", hint=SETUP_HINT)
        return path

    @property
    def converter(self) -> Path:
        if self.source_dir is None or not (self.source_dir / "convert_hf_to_gguf.py").is_file():
            raise ToolchainMissingError(
                "convert_hf_to_gguf.py of the pinned llama.cpp was not found", hint=SETUP_HINT
            )
        return self.source_dir / "convert_hf_to_gguf.py"


def gpu_present() -> bool:
    """True when nvidia-smi exists (cheap check; doctor runs it for details)."""
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()


def source_dir(pin: Pin) -> Path:
    return cache_root() / "llama.cpp" / f"src-{pin.short}"


def _cached_builds(pin: Pin) -> list[tuple[Path, dict[str, object]]]:
    builds = []
    for marker in sorted((cache_root() / "llama.cpp").glob(f"build-{pin.short}-*/qwrap-build.json")):
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("commit") == pin.commit and (marker.parent / "bin" / "llama-quantize").exists():
            builds.append((marker.parent, meta))
    return builds


def _from_cache(pin: Pin) -> Toolchain | None:
    builds = _cached_builds(pin)
    if not builds:
        return None
    want = "cuda" if gpu_present() else "cpu"
    # the variant this machine wants, then a build with every tool (one from before a tool was
    # added lacks it until `qwrap setup` extends it), then the newest
    builds.sort(key=lambda b: (b[1].get("variant") == want, all((b[0] / "bin" / t).exists() for t in TOOLS),
                               b[0].stat().st_mtime))
    path, meta = builds[-1]
    src = Path(str(meta.get("source", source_dir(pin))))
    return Toolchain(path / "bin", src, pin.commit, str(meta.get("variant")), "cache")


def _from_dir(directory: Path, pin: Pin) -> Toolchain | None:
    for candidate in (directory / "bin", directory / "build" / "bin", directory):
        if (candidate / "llama-quantize").is_file():
            src = directory if (directory / "convert_hf_to_gguf.py").is_file() else source_dir(pin)
            return Toolchain(candidate, src, "unknown", "unknown", "QWRAP_LLAMA_CPP_DIR")
    return None


def find_toolchain() -> Toolchain:
    pin = read_pin()
    found = _from_cache(pin)
    if found is None and os.environ.get("QWRAP_LLAMA_CPP_DIR"):
        found = _from_dir(Path(os.environ["QWRAP_LLAMA_CPP_DIR"]), pin)
        if found is None:
            raise ToolchainMissingError(
                f"QWRAP_LLAMA_CPP_DIR={os.environ['QWRAP_LLAMA_CPP_DIR']} holds no llama-quantize",
                hint="Point it at a llama.cpp build folder (with bin/llama-quantize), or unset it.",
            )
    if found is None and shutil.which("llama-quantize"):
        bin_dir = Path(str(shutil.which("llama-quantize"))).parent
        found = Toolchain(bin_dir, source_dir(pin), "unknown", "unknown", "PATH")
    if found is None:
        raise ToolchainMissingError(
            f"the pinned llama.cpp ({pin.commit[:7]}) is not built "
            f"(looked in {cache_root() / 'llama.cpp'}, $QWRAP_LLAMA_CPP_DIR and PATH)",
            hint=SETUP_HINT,
        )
    return found


_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")
_MMPROJ_MAP = re.compile(r"^MMPROJ_MODEL_MAP\b[^{]*\{(.*?)^\}", re.MULTILINE | re.DOTALL)


def _converter_source() -> Path:
    source = source_dir(read_pin())
    try:
        return find_toolchain().source_dir or source
    except ToolchainMissingError:
        return source


def mmproj_architectures(source: Path | None = None) -> set[str]:
    """Architectures whose vision projector the pinned converter writes (``--mmproj``): the keys
    of its ``MMPROJ_MODEL_MAP``, read from its source (no import); empty when it has none."""
    source = source or _converter_source()
    try:
        text = (source / "conversion" / "__init__.py").read_text()
    except OSError:
        return set()
    found = _MMPROJ_MAP.search(text)
    return set(re.findall(r"^\s*[\"']([A-Za-z0-9_]+)[\"']\s*:", found[1], re.MULTILINE)) if found else set()


def supported_architectures(source: Path | None = None) -> set[str]:
    """Architectures the pinned converter registers, read from its source (no import)."""
    source = source or _converter_source()
    files = [source / "convert_hf_to_gguf.py", *sorted((source / "conversion").glob("*.py"))]
    names: set[str] = set()
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for args in _REGISTER.findall(text):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    if not names:
        raise ToolchainMissingError(f"no converter source in {source}", hint=SETUP_HINT)
    return names
