"""``python -m qwrap.workers.gptq_autogptq JOB.json``: GPTQ with the archived AutoGPTQ 0.7.1.

AutoGPTQ refuses to load a model for quantization without CUDA, so on a CPU-only host (or
with ``--device cpu``) this worker stops before loading anything and points to GPTQModel,
its maintained successor, which writes the same layout. On CUDA it runs AutoGPTQ's own
layer loop; layer events come from its "Start quantizing layer i/n" log lines. AutoGPTQ
has no per-layer checkpoints: an interrupted run starts over.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from qwrap.workers import protocol as p
from qwrap.workers.runtime import LayerMeter, WorkerError, check_group_size, resolve_device, run, versions, warn

NO_CUDA_HINT = ("Use --backend gptqmodel: it quantizes GPTQ on CPU or CUDA and writes the same "
                "checkpoint layout.")


def main(job: p.QuantizeJob) -> None:
    p.emit(p.Started(task="quantize", backend="auto-gptq", pid=os.getpid(), device=job.device,
                     versions=versions("auto-gptq")))
    import torch

    if job.device == "cpu" or not torch.cuda.is_available():
        raise WorkerError("backend_unavailable",
                          "auto-gptq quantizes only on a CUDA GPU and none is "
                          + ("selected (--device cpu)" if job.device == "cpu" else "visible"),
                          hint=NO_CUDA_HINT)
    _quantize(job, resolve_device(job.device))


def _quantize(job: p.QuantizeJob, device: str) -> None:
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
    from transformers import AutoTokenizer

    from qwrap.workers import artifact
    from qwrap.workers.calib import load_samples

    started = time.monotonic()
    model_dir = Path(job.model)
    samples = load_samples(job.calibration, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=job.trust_remote_code),
                           model_dir)
    if job.checkpoint_dir:
        warn("auto-gptq has no per-layer checkpoints: an interrupted run restarts from the first "
             "layer (--backend gptqmodel resumes)")
    config = BaseQuantizeConfig(bits=job.bits, group_size=job.group_size, damp_percent=job.damp,
                                desc_act=job.act_order, sym=job.sym, model_file_base_name="model")
    import torch

    model = AutoGPTQForCausalLM.from_pretrained(str(model_dir), config, torch_dtype=torch.float16,
                                                trust_remote_code=job.trust_remote_code)
    check_group_size(model.model, job.group_size)
    listener = _LayerLog(LayerMeter(cuda=True))
    log = logging.getLogger("auto_gptq.modeling._base")
    log.setLevel(logging.INFO)
    log.addHandler(listener)
    model.quantize([{"input_ids": row, "attention_mask": [1] * len(row)} for row in samples.as_lists()],
                   batch_size=1)
    listener.finish()
    out = Path(job.output_dir)
    model.save_quantized(str(out), use_safetensors=True)
    artifact.use_source_files(model_dir, out)
    metadata = {"format": "gptq", "backend": "auto-gptq", "calibration": samples.metadata,
                "quantization": {"bits": job.bits, "group_size": job.group_size,
                                 "desc_act": job.act_order, "sym": job.sym, "damp_percent": job.damp},
                "versions": versions("auto-gptq")}
    artifact.write_metadata(out, metadata)
    artifact.check_complete(out)
    p.emit(p.Result(output_dir=str(out), files=artifact.list_files(out), metadata={
        **metadata, "device": device, "calibration_cache_hit": samples.cache_hit,
        "seconds": round(time.monotonic() - started, 3)}))


class _LayerLog(logging.Handler):
    """AutoGPTQ logs "Start quantizing layer i/n" (1-based) at the start of each layer."""

    PATTERN = re.compile(r"Start quantizing layer (\d+)/(\d+)")

    def __init__(self, meter: LayerMeter) -> None:
        super().__init__(level=logging.INFO)
        self.meter = meter
        self.current: tuple[int, int] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.finish()
            self.current = (int(match.group(1)) - 1, int(match.group(2)))
            self.meter.start()
            p.emit(p.LayerStarted(index=self.current[0], total=self.current[1]))

    def finish(self) -> None:
        if self.current is not None:
            p.emit(self.meter.stop(*self.current))
            self.current = None


if __name__ == "__main__":
    run(p.QuantizeJob, main, backend="auto-gptq")
