"""Which architectures each AWQ/GPTQ backend can quantize, as the backend itself says, checked
in `plan` before any weights are downloaded or loaded.

The backend's own model table (``workers/support.py`` reads it in the backend's environment)
is kept beside the environment, so it is read once per environment (its folder name is its
key); a model's probe -- the backend's own layer walk on a weightless skeleton of the model --
is kept there too, by the model's config. No hand-kept list: a new backend version brings its
own table.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .children import run_checked
from .envs import find_env
from .errors import QwrapError, ToolchainMissingError
from .toolchain import cache_root
from .worker_client import worker_env

TABLE_FILE = "qwrap-support.json"
PROBES_DIR = "qwrap-support-probes"
MODULE = "qwrap.workers.support"
PROBE_VERSION = 3  # in a kept probe's key: a probe that learnt more is asked again


@dataclass(frozen=True)
class Support:
    backend: str
    model_type: str
    listed: bool  # the backend's table has the model type
    probe_ok: bool | None  # its layer walk on the model's skeleton (None: not probed)
    reason: str

    @property
    def ok(self) -> bool:
        return self.listed and self.probe_ok is not False


def _ask(backend: str, *extra: str) -> dict[str, Any]:
    env = find_env(backend)
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    run_checked([env.python, "-m", MODULE, backend, *extra], what=f"{backend}'s model table",
                log_path=logs / f"support-{backend}.log", env=worker_env(1), on_line=lines.append, timeout=600)
    for line in reversed(lines):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict) and "model_types" in found:
            return found
    raise QwrapError(f"{backend}'s model table could not be read", hint=f"See {logs / f'support-{backend}.log'}.")


def _kept(path: Path, compute: Any) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    except (OSError, ValueError):
        pass
    data = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return data


def model_types(backend: str) -> frozenset[str]:
    """The model types ``backend``'s own table lists (read once per environment)."""
    env = find_env(backend)
    return frozenset(_kept(env.path / TABLE_FILE, lambda: _ask(backend))["model_types"])


def support(backend: str, config: dict[str, Any], config_path: Path, fmt: str) -> Support | None:
    """Whether ``backend`` can quantize this model for ``fmt`` (None when its environment is not
    created: the toolchain check says so)."""
    model_type = str(config.get("model_type") or "")
    try:
        listed = model_type in model_types(backend)
    except ToolchainMissingError:
        return None
    if not listed:
        return Support(backend, model_type, False, None, f"{backend}'s model table has no {model_type!r}")
    key = hashlib.sha256(json.dumps([PROBE_VERSION, config], sort_keys=True).encode()).hexdigest()[:24]
    path = find_env(backend).path / PROBES_DIR / f"{key}.json"
    probe = _kept(path, lambda: _ask(backend, str(config_path))).get("probe") or {}
    if probe.get("ok", True):  # the walk passed: what the backend's code for this format says
        probe = (probe.get("formats") or {}).get(fmt) or probe
    return Support(backend, model_type, True, bool(probe.get("ok", True)), str(probe.get("reason", "")))
