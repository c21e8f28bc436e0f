"""`qwrap doctor`: what is installed, where, and what is missing (with the fix)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__, envs
from .children import run_checked
from .errors import QwrapError, ToolchainMissingError
from .toolchain import TOOLS, cache_root, find_toolchain, read_pin


def _gpu() -> dict[str, Any]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"present": False, "detail": "nvidia-smi not found: CPU only"}
    try:
        result = run_checked([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], what="nvidia-smi",
                             log_path=_log(), timeout=20)
    except QwrapError as exc:
        return {"present": False, "detail": f"nvidia-smi failed: {exc.message}"}
    return {"present": True, "devices": list(result.tail)}


def _log() -> Path:
    return cache_root() / "logs" / "doctor.log"


def _toolchain() -> dict[str, Any]:
    pin = read_pin()
    info: dict[str, Any] = {"pinned_commit": pin.commit, "archive": pin.archive_file,
                            "archive_sha256": pin.archive_sha256}
    try:
        tc = find_toolchain()
    except ToolchainMissingError as exc:
        return {**info, "ok": False, "problem": exc.message, "fix": exc.hint}
    tools = {t: str(tc.bin_dir / t) if (tc.bin_dir / t).exists() else None for t in TOOLS}
    try:
        tail = run_checked([tc.bin_dir / "llama-imatrix", "--version"], what="llama-imatrix --version",
                           log_path=_log(), timeout=20).tail
    except QwrapError as exc:
        tail = (f"unknown ({exc.message})",)
    return {**info, "ok": all(tools.values()), "origin": tc.origin, "variant": tc.variant,
            "bin_dir": str(tc.bin_dir), "source_dir": str(tc.source_dir), "tools": tools,
            "version": " ".join(line for line in tail if "version" in line or "built" in line or "unknown" in line)}


def _envs() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in envs.SPECS:
        try:
            env = envs.find_env(name)
            out[name] = {"ok": True, "path": str(env.path), "packages": envs.pinned(name)}
        except ToolchainMissingError as exc:
            out[name] = {"ok": False, "path": None, "fix": exc.hint or exc.message}
    return out


def collect() -> dict[str, Any]:
    info: dict[str, Any] = {"schema": "qwrap.doctor/1", "qwrap_version": __version__, "cache": str(cache_root()),
            "llama_cpp": _toolchain(), "environments": _envs(), "gpu": _gpu()}
    missing = ([] if info["llama_cpp"]["ok"] else ["llama.cpp"]) + [n for n, e in info["environments"].items()
                                                                      if not e["ok"]]
    info["missing"] = missing
    info["fix"] = envs.setup_command(missing) if missing else None
    return info


def render(info: dict[str, Any], console: Console) -> None:
    lc = info["llama_cpp"]
    console.print(f"qwrap {info['qwrap_version']}  cache: {info['cache']}")
    console.print(f"llama.cpp pin {lc['pinned_commit'][:12]}: " + (
        f"[green]ok[/green] ({lc['origin']}, {lc['variant']}) {lc['bin_dir']}" if lc.get("ok")
        else f"[red]missing[/red]: {lc.get('problem')} — {lc.get('fix')}"))
    table = Table(title="environments")
    for col in ("name", "state", "path / fix"):
        table.add_column(col)
    for name, e in info["environments"].items():
        table.add_row(name, "[green]ok[/green]" if e["ok"] else "[yellow]not created[/yellow]",
                      str(e["path"] if e["ok"] else e["fix"]))
    console.print(table)
    gpu = info["gpu"]
    console.print("GPU: " + (", ".join(gpu["devices"]) if gpu["present"] else gpu["detail"]))
    if info["missing"]:
        console.print(f"[yellow]missing[/yellow]: {', '.join(info['missing'])}. One command fixes it: "
                      f"[bold]{info['fix']}[/bold]", highlight=False)
    else:
        console.print("[green]nothing missing[/green]")
