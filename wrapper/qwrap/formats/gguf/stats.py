"""Calibration statistics kept between runs: an importance matrix and a sensitivity depend
only on the model, the calibration text, the pinned tools and their parameters -- all of which
the step's fingerprint chains -- so they are kept in ``toolchain.stats_dir()`` by fingerprint,
and every budget of a run, a rerun with another budget and a run into another output folder
reuse them (and say so)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...context import StepContext
from ...plan import Step
from ...toolchain import stats_dir


def kept(step: Step, suffix: str) -> Path | None:
    """Where ``step``'s statistic is kept: ``<kind>-<fingerprint><suffix>`` (None: nothing is
    kept, QWRAP_STATS_DIR=none)."""
    root = stats_dir()
    return root / f"{step.kind.split('.')[-1]}-{step.fingerprint}{suffix}" if root is not None else None


def reuse(step: Step, out: Path, suffix: str, what: str, ctx: StepContext) -> bool:
    """Copy the kept statistic to ``out`` (through a partial name) and say so; False when none is kept."""
    source = kept(step, suffix)
    if source is None or not source.is_file():
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".copying")
    shutil.copyfile(source, tmp)
    os.replace(tmp, out)
    ctx.warning(f"{what} reused from the cache ({source}): same model, calibration text and tools")
    return True


def keep(step: Step, made: Path, suffix: str) -> None:
    """Keep a copy of a statistic just made (atomically: a partial copy is never seen). A cache
    that cannot be written costs only the reuse."""
    target = kept(step, suffix)
    if target is None:
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
        shutil.copyfile(made, tmp)
        os.replace(tmp, target)
    except OSError:
        pass
