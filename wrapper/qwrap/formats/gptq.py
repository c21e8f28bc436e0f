"""GPTQ: by gptqmodel (default, maintained, CPU and GPU) or the archived auto-gptq (CUDA
only), each in its own environment; the artifact is a standard Hugging Face folder."""

from __future__ import annotations

from ..context import RunContext, StepOutcome
from ..errors import BackendUnavailableError, UsageError
from ..hub import ModelSource
from ..plan import Step, StepBuilder
from ..request import Request
from ..toolchain import gpu_present
from . import hfquant

NAME = "gptq"


def validate_options(request: Request) -> None:
    o = request.quant_options
    hfquant.check_common(request, NAME, o.gptq_backend)
    if not 0 < o.damp < 1:
        raise UsageError(f"--damp must be between 0 and 1, not {o.damp}")
    if o.gptq_backend == "auto-gptq" and (o.device == "cpu" or not gpu_present()):
        # auto-gptq refuses to quantize without CUDA; say so before any model is loaded.
        raise BackendUnavailableError(
            "auto-gptq (archived upstream) can only quantize on a CUDA GPU, and none is available here",
            hint="Use --backend gptqmodel, its maintained successor, which quantizes GPTQ on CPU and GPU.",
        )


def add_steps(b: StepBuilder, request: Request, source: ModelSource, calib_sha: str | None) -> None:
    o = request.quant_options
    hfquant.add_quant_steps(b, request, source, calib_sha, fmt=NAME, backend=o.gptq_backend,
                            params={"sym": o.sym, "act_order": o.act_order, "damp": o.damp})


def execute(step: Step, ctx: RunContext) -> StepOutcome:
    return hfquant.execute(step, ctx)


estimate_bytes = hfquant.estimate_bytes
