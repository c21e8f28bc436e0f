"""AWQ: activation-aware weight quantization by autoawq (default) or gptqmodel, in the
backend's own environment; the artifact is a standard Hugging Face folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..options import Listing, Option
from ..plan import PlanBuilder
from . import hfquant

# what AWQ shares with GPTQ, assigned by name (the Format Protocol's functions)
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

NAME = "awq"
TITLE = hfquant.PANEL
SUMMARY = "a Hugging Face folder, 4-bit activation-aware quantization (autoawq or gptqmodel)"
BACKENDS: tuple[str, ...] = ("autoawq", "gptqmodel")
VERSIONS = ("gemm", "gemv")

OPTIONS: tuple[Option, ...] = (
    *hfquant.COMMON_OPTIONS,
    Option("awq_version", str, "gemm", "AWQ kernel layout: gemm or gemv."),
    Option("zero_point", bool, True, "AWQ asymmetric quantization with zero points."),
)


@dataclass(frozen=True)
class Options(hfquant.Common):
    awq_version: str = "gemm"
    zero_point: bool = True


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    return hfquant.make(Options, values, backend or BACKENDS[0])


def options_from_json(data: Mapping[str, Any]) -> Options:
    return hfquant.from_json(Options, data, BACKENDS[0])


def validate(o: Options) -> None:
    hfquant.validate_common(o, NAME)
    if o.awq_version not in VERSIONS:
        raise UsageError(f"--awq-version must be gemm or gemv, not {o.awq_version!r}")


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    hfquant.add_steps(b, o, model, fmt=NAME, own={"zero_point": o.zero_point, "version": o.awq_version})


def listing() -> Listing:
    return hfquant.listing(NAME, BACKENDS)
