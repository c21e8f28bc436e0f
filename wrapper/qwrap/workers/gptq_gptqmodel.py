"""``python -m qwrap.workers.gptq_gptqmodel JOB.json``: GPTQ with GPTQModel 7.6 (CPU or CUDA).

Writes the GPTQ layout auto-gptq, transformers (with optimum) and vLLM read.
"""

from __future__ import annotations

from typing import Any

from qwrap.workers import protocol as p
from qwrap.workers.gptqmodel_common import quantize
from qwrap.workers.runtime import run


def settings(job: p.QuantizeJob) -> dict[str, Any]:
    """GPTQModel QuantizeConfig fields for ``job``."""
    # desc_act and GPTQModel's act_group_aware exclude each other; say which one explicitly.
    return {"method": "gptq", "format": "gptq", "bits": job.bits, "group_size": job.group_size,
            "desc_act": job.act_order, "act_group_aware": not job.act_order, "sym": job.sym,
            "damp_percent": job.damp}


def main(job: p.QuantizeJob) -> None:
    quantize(job, settings=settings(job), metadata={
        "format": "gptq", "backend": "gptqmodel",
        "quantization": {"bits": job.bits, "group_size": job.group_size, "desc_act": job.act_order,
                         "sym": job.sym, "damp_percent": job.damp}})


if __name__ == "__main__":
    run(p.QuantizeJob, main, backend="gptqmodel")
