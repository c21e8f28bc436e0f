"""``python -m qwrap.workers.awq_gptqmodel JOB.json``: AWQ with GPTQModel 7.6.

On CPU GPTQModel packs AWQ with its torch kernel (GEMM layout only); on CUDA it also
writes GEMV. The checkpoint has the AutoAWQ layout (``quant_method: awq``).
"""

from __future__ import annotations

from typing import Any

from qwrap.workers import protocol as p
from qwrap.workers.gptqmodel_common import quantize
from qwrap.workers.runtime import run


def settings(job: p.QuantizeJob) -> dict[str, Any]:
    """GPTQModel QuantizeConfig fields for ``job`` (AWQ's zero point is asymmetric = not sym)."""
    return {"method": "awq", "format": job.version, "bits": job.bits, "group_size": job.group_size,
            "sym": not job.zero_point}


def main(job: p.QuantizeJob) -> None:
    quantize(job, settings=settings(job), metadata={
        "format": "awq", "backend": "gptqmodel",
        "quantization": {"bits": job.bits, "group_size": job.group_size,
                         "zero_point": job.zero_point, "version": job.version}})


if __name__ == "__main__":
    run(p.QuantizeJob, main, backend="gptqmodel")
