"""AWQ: activation-aware weight quantization by autoawq (default) or gptqmodel, in the
backend's own environment; the artifact is a standard Hugging Face folder."""

from __future__ import annotations

from ..context import RunContext, StepOutcome
from ..errors import UsageError
from ..hub import ModelSource
from ..plan import Step, StepBuilder
from ..request import Request
from . import hfquant

NAME = "awq"


def validate_options(request: Request) -> None:
    o = request.quant_options
    hfquant.check_common(request, NAME, o.awq_backend)
    if o.awq_version not in ("gemm", "gemv"):
        raise UsageError(f"--awq-version must be gemm or gemv, not {o.awq_version!r}")


def add_steps(b: StepBuilder, request: Request, source: ModelSource, calib_sha: str | None) -> None:
    o = request.quant_options
    hfquant.add_quant_steps(b, request, source, calib_sha, fmt=NAME, backend=o.awq_backend,
                            params={"zero_point": o.zero_point, "version": o.awq_version})


def execute(step: Step, ctx: RunContext) -> StepOutcome:
    return hfquant.execute(step, ctx)


estimate_bytes = hfquant.estimate_bytes
