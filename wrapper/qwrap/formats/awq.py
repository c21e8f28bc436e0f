"""AWQ: activation-aware weight quantization by gptqmodel (default) or autoawq, in the
backend's own environment; the artifact is a standard Hugging Face folder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UsageError
from ..options import Listing, Option
from ..workers.backends import backends_for

# what AWQ shares with GPTQ: Format Protocol functions assigned by name, and the helpers used below
from .hfbase import (  # noqa: F401
    LIBRARY,
    PANEL,
    card_usage,
    checks,
    execute,
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

NAME = "awq"
TITLE = PANEL
SUMMARY = "a Hugging Face folder, 4-bit activation-aware quantization (gptqmodel, or autoawq)"
BACKENDS: tuple[str, ...] = backends_for(NAME)  # declared in workers/backends.py, the default first
VERSIONS = ("gemm", "gemv")

OPTIONS: tuple[Option, ...] = (
    *COMMON_OPTIONS,
    Option("awq_version", str, "gemm", "AWQ kernel layout: gemm or gemv."),
    Option("zero_point", bool, True, "AWQ asymmetric quantization with zero points."),
)


@dataclass(frozen=True)
class Options(Common):
    FORMAT: ClassVar[str] = "awq"
    awq_version: str = "gemm"
    zero_point: bool = True


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    return make(Options, values, backend or BACKENDS[0])


def options_from_json(data: Mapping[str, Any]) -> Options:
    return from_json(Options, data, BACKENDS[0])


def validate(o: Options) -> None:
    validate_common(o, NAME)
    if o.awq_version not in VERSIONS:
        raise UsageError(f"--awq-version must be gemm or gemv, not {o.awq_version!r}")


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    add_hf_steps(b, o, model, fmt=NAME, own={"zero_point": o.zero_point, "version": o.awq_version})


def listing() -> Listing:
    return hf_listing(NAME, BACKENDS)
