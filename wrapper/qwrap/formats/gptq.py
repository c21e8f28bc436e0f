"""GPTQ: by gptqmodel (default, maintained, CPU and GPU) or the archived auto-gptq (CUDA
only), each in its own environment; the artifact is a standard Hugging Face folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import BackendUnavailableError, UsageError
from ..options import Listing, Option
from ..workers.backends import backends_for

# what GPTQ shares with AWQ: Format Protocol functions assigned by name, and the helpers used below
from .hfbase import (  # noqa: F401
    LIBRARY,
    PANEL,
    card_usage,
    checks,
    execute,
    gpu_present,
    needs_calibration,
    plan_artifact,
    publishable,
    requirements,
    result_fields,
    validate_common,
    wants_calibration,
)
from .hfbase import add_steps as add_hf_steps
from .hfbase import listing as hf_listing
from .hfoptions import COMMON_OPTIONS, Common, from_json, make

if TYPE_CHECKING:
    from ..model import ModelInfo
    from ..plan import PlanBuilder

NAME = "gptq"
TITLE = PANEL
SUMMARY = "a Hugging Face folder, 2/3/4/8-bit GPTQ (gptqmodel, or auto-gptq on CUDA)"
BACKENDS: tuple[str, ...] = backends_for(NAME)  # declared in workers/backends.py, the default first

OPTIONS: tuple[Option, ...] = (
    *COMMON_OPTIONS,
    Option("act_order", bool, False, "GPTQ: quantize columns in order of activation size."),
    Option("sym", bool, True, "GPTQ symmetric quantization."),
    Option("damp", float, 0.01, "GPTQ dampening fraction."),
)


@dataclass(frozen=True)
class Options(Common):
    FORMAT: ClassVar[str] = "gptq"
    act_order: bool = False
    sym: bool = True
    damp: float = 0.01


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    return make(Options, values, backend or BACKENDS[0])


def options_from_json(data: Mapping[str, Any]) -> Options:
    return from_json(Options, data, BACKENDS[0])


def validate(o: Options) -> None:
    validate_common(o, NAME)
    if not 0 < o.damp < 1:
        raise UsageError(f"--damp must be between 0 and 1, not {o.damp}")
    if o.backend == "auto-gptq" and (o.device == "cpu" or not gpu_present()):
        # auto-gptq refuses to quantize without CUDA; say so before any model is loaded.
        raise BackendUnavailableError(
            "auto-gptq (archived upstream) can only quantize on a CUDA GPU, and none is available here",
            hint="Use --backend gptqmodel, its maintained successor, which quantizes GPTQ on CPU and GPU.",
        )


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    add_hf_steps(b, o, model, fmt=NAME, own={"sym": o.sym, "act_order": o.act_order, "damp": o.damp})


def listing() -> Listing:
    return hf_listing(NAME, BACKENDS)
