"""GPTQ: by gptqmodel (default, maintained, CPU and GPU) or the archived auto-gptq (CUDA
only), each in its own environment; the artifact is a standard Hugging Face folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailableError, UsageError
from ..options import Listing, Option
from ..plan import PlanBuilder
from . import hfquant

# what GPTQ shares with AWQ, assigned by name (the Format Protocol's functions)
from .hfquant import (  # noqa: F401
    LIBRARY,
    card_usage,
    checks,
    execute,
    needs_calibration,
    plan_artifact,
    publishable,
    requirements,
    result_fields,
    wants_calibration,
)

if TYPE_CHECKING:
    from ..model import ModelInfo

NAME = "gptq"
TITLE = hfquant.PANEL
SUMMARY = "a Hugging Face folder, 2/3/4/8-bit GPTQ (gptqmodel, or auto-gptq on CUDA)"
BACKENDS: tuple[str, ...] = ("gptqmodel", "auto-gptq")

OPTIONS: tuple[Option, ...] = (
    *hfquant.COMMON_OPTIONS,
    Option("act_order", bool, False, "GPTQ: quantize columns in order of activation size."),
    Option("sym", bool, True, "GPTQ symmetric quantization."),
    Option("damp", float, 0.01, "GPTQ dampening fraction."),
)


@dataclass(frozen=True)
class Options(hfquant.Common):
    act_order: bool = False
    sym: bool = True
    damp: float = 0.01


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    return hfquant.make(Options, values, backend or BACKENDS[0])


def options_from_json(data: Mapping[str, Any]) -> Options:
    return hfquant.from_json(Options, data, BACKENDS[0])


def validate(o: Options) -> None:
    hfquant.validate_common(o, NAME)
    if not 0 < o.damp < 1:
        raise UsageError(f"--damp must be between 0 and 1, not {o.damp}")
    from ..toolchain import gpu_present

    if o.backend == "auto-gptq" and (o.device == "cpu" or not gpu_present()):
        # auto-gptq refuses to quantize without CUDA; say so before any model is loaded.
        raise BackendUnavailableError(
            "auto-gptq (archived upstream) can only quantize on a CUDA GPU, and none is available here",
            hint="Use --backend gptqmodel, its maintained successor, which quantizes GPTQ on CPU and GPU.",
        )


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    hfquant.add_steps(b, o, model, fmt=NAME, own={"sym": o.sym, "act_order": o.act_order, "damp": o.damp})


def listing() -> Listing:
    return hfquant.listing(NAME, BACKENDS)
