"""`qwrap plan --emit KIND PATH`: the plan as a scheduler's jobs (stages.py cuts it, one
emitter per scheduler writes it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import emit_actions, emit_slurm
from .errors import UsageError
from .plan import Plan
from .preflight import PlanReport
from .stages import TaskCommand, stages, write_files
from .toolchain import gpu_present

KINDS = ("slurm", "github-actions")


def emit(kind: str, dest: Path, plan: Plan, cmd: TaskCommand, *, partition: str | None, gpu_partition: str | None,
         account: str | None, model_name: str, cpus: int = 0) -> list[Path]:
    """Write the jobs; returns the files written (for slurm the last one is submit.sh)."""
    if kind not in KINDS:
        raise UsageError(f"--emit {kind!r} is not a scheduler qwrap writes jobs for",
                         hint=f"Choose from: {', '.join(KINDS)} (or build your own from `qwrap plan --json`).")
    stage_list = stages(plan, cpus=cpus)
    dest = dest.resolve()
    if kind == "github-actions":
        if dest.is_dir():
            raise UsageError(f"{dest} is a folder", hint="--emit github-actions takes a FILE, e.g. .github/workflows/quantize.yml.")
        return write_files(dest.parent, {dest.name: emit_actions.render(stage_list, cmd, model_name)}, executable=False)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} is a file", hint="--emit slurm takes a folder for the scripts.")
    opts = emit_slurm.SlurmOptions(partition, gpu_partition, account, Path(os.getcwd()), dest / "logs")
    return write_files(dest, emit_slurm.render(stage_list, cmd, opts), executable=True)


def pinned_defaults(values: Mapping[str, Any], report: PlanReport) -> dict[str, Any]:
    """The option values a job's `qwrap run` must carry beyond what was typed: the texts as the
    request resolved them, and what this host decided for the defaults, so that a CPU node and
    a GPU node build the same plan: the evaluation's size (sized to the run from estimates that
    depend on the device) and the weights view."""
    request = report.request
    pinned: dict[str, Any] = {"calib": request.calib, "eval_text": request.eval_text}
    ev = report.model.evaluation
    if ev is not None and not values.get("eval_tokens"):
        pinned["eval_tokens"] = ev.tokens
    if values.get("eval_weights") == "auto":
        pinned["eval_weights"] = "on" if gpu_present() else "off"
    return pinned
