"""Checks before heavy work, made on the same Plan that `run` executes: free disk for the plan's
own estimates, room in the Hugging Face cache for a Hub model's weights, the toolchain; the
formats add their model checks (architecture, tokenizer, group size).

Reads only config.json, the tokenizer files and safetensors headers (a Hub model is resolved
without its weights). `plan` reports every check; `run` raises the first failing one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import envs
from .checks import Check
from .errors import InsufficientDiskError, QwrapError
from .evaltext import planned_precision
from .formats import FORMATS
from .model import ModelInfo
from .plan import Plan
from .request import Request
from .toolchain import find_toolchain
from .units import human_bytes

PLAN_SCHEMA = "qwrap.plan/2"


def _free(path: Path) -> tuple[Path, int]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def disk_check(plan: Plan, output: Path) -> tuple[Check, dict[str, Any]]:
    needed = plan.totals()["peak_disk_bytes"]
    where, free = _free(output)
    ok = needed <= free
    error = None if ok else InsufficientDiskError(
        f"{output} needs about {human_bytes(needed)} but {where} has {human_bytes(free)} free",
        hint="Free space or choose another --output; --no-preflight skips this check.",
    )
    check = Check("disk", ok, f"needs about {human_bytes(needed)} in {where}, {human_bytes(free)} free", error)
    return check, {"path": str(output), "peak_bytes": needed, "free_bytes": free}


def hub_cache_check(model: ModelInfo) -> tuple[Check | None, dict[str, Any]]:
    """A Hub model's weights land in the Hugging Face cache, usually on another disk."""
    source = model.source
    if source.repo_id is None:
        return None, {}
    cache = source.path
    while cache.name and cache.name != "hub":
        cache = cache.parent
    cache = cache if cache.name == "hub" else source.path
    missing = model.shape.weight_bytes if not any(source.path.glob("*.safetensors")) else 0
    where, free = _free(cache)
    ok = missing <= free
    error = None if ok else InsufficientDiskError(
        f"downloading {source.repo_id} needs about {human_bytes(missing)} in {where}, which has "
        f"{human_bytes(free)} free",
        hint="Free space, or point HF_HOME at a bigger disk.",
    )
    check = Check("hub cache", ok, f"weights to download: {human_bytes(missing)}, {human_bytes(free)} free in {where}",
                  error)
    return check, {"path": str(where), "download_bytes": missing, "free_bytes": free}


def model_checks(request: Request, model: ModelInfo, *, thorough: bool) -> list[Check]:
    found: list[Check] = []
    for name in request.formats:
        for check in FORMATS[name].checks(request.options(name), model, thorough=thorough):
            if all(c.name != check.name for c in found):
                found.append(check)
    return found


def requirements(request: Request) -> list[str]:
    """What the run needs installed: "llama.cpp" and environment names, from the formats."""
    needed: list[str] = []
    for name in request.formats:
        needed += FORMATS[name].requirements(request.options(name))
    if request.calib in (None, "wikitext2") and (needs_calibration(request) or wants_calibration(request)):
        needed.append("convert")  # WikiText-2's parquet file is turned into text there
    return list(dict.fromkeys(needed))


def needs_calibration(request: Request) -> bool:
    return any(FORMATS[name].needs_calibration(request.options(name)) for name in request.formats)


def wants_calibration(request: Request) -> bool:
    return any(FORMATS[name].wants_calibration(request.options(name)) for name in request.formats)


def check_toolchain(request: Request) -> None:
    """Every tool and environment the run needs exists, before any heavy work."""
    for name in requirements(request):
        if name == "llama.cpp":
            find_toolchain().converter  # noqa: B018 - raises with the fix when missing
        else:
            envs.find_env(name)


def toolchain_check(request: Request) -> Check:
    try:
        check_toolchain(request)
    except QwrapError as exc:
        return Check("toolchain", False, f"{exc.message} ({exc.hint})", exc)
    return Check("toolchain", True, "llama.cpp build and environments present")


@dataclass(frozen=True)
class PlanReport:
    """What `qwrap plan` prints: the plan `run` would execute, its estimates and the checks."""

    request: Request
    model: ModelInfo
    plan: Plan
    checks: tuple[Check, ...]
    disk: dict[str, Any]

    def artifacts(self) -> list[dict[str, Any]]:
        return [FORMATS[s.format].plan_artifact(s, self.plan) for s in self.plan.steps if s.deliverable]

    def to_json(self) -> dict[str, Any]:
        src = self.model.source
        return {"schema": PLAN_SCHEMA, "model": self.request.model, "name": src.name, "repo_id": src.repo_id,
                "revision": src.revision, "architecture": self.model.architecture,
                "parameters": self.model.shape.parameters, "source_fingerprint": self.model.fingerprint,
                "calibration": self.model.calibration.label if self.model.calibration else None,
                "steps": [s.to_json() for s in self.plan.steps], "artifacts": self.artifacts(),
                "totals": self.plan.totals(), "disk": self.disk, "checks": [c.to_json() for c in self.checks],
                "evaluation": planned_precision(self.model.evaluation, self.request.max_kld)}
