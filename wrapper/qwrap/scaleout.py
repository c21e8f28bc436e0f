"""`qwrap plan --emit KIND PATH`: the plan as a scheduler's jobs (stages.py cuts it, one
emitter per scheduler writes it)."""

from __future__ import annotations

import os
from pathlib import Path

from . import emit_actions, emit_slurm
from .errors import UsageError
from .plan import Plan
from .stages import TaskCommand, stages, write_files

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
