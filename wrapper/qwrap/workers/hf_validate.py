"""``python -m qwrap.workers.hf_validate JOB.json``: does an AWQ/GPTQ folder load and agree
with its source model? Runs in the gptqmodel environment (transformers + gptqmodel kernels).

The reference model runs first over the held-out samples and its next-token log-probs are
kept (float32, on the CPU); then it is freed and the quantized model is loaded, so the two
never share memory. Reported: the mean KL(reference || quantized) over every position, the
share of positions where both pick the same top token, and both perplexities. An artifact
that fails to load or yields non-finite logits is an ``error`` (kind ``validation``).
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path
from typing import Any

from qwrap.workers import hf_eval
from qwrap.workers import protocol as p
from qwrap.workers.gptqmodel_common import prepare_environment
from qwrap.workers.runtime import WorkerError, resolve_device, run, versions


def main(job: p.ValidateJob) -> None:
    prepare_environment()
    p.emit(p.Started(task="validate", backend="gptqmodel", pid=os.getpid(), device=job.device,
                     versions=versions("gptqmodel", "optimum")))
    import torch
    from transformers import AutoTokenizer

    from qwrap.workers import artifact
    from qwrap.workers.calib import load_samples

    started = time.monotonic()
    device = resolve_device(job.device)
    tokenizer = AutoTokenizer.from_pretrained(job.model, trust_remote_code=job.trust_remote_code)
    weights_only = job.quantized.endswith(".gguf")  # a GGUF file: its weights, dequantized, on the eval chunks
    chunks = hf_eval.chunk_ids(job, tokenizer) if job.eval_chunks else []
    # With an evaluation, its chunks are the validation too (the artifact loaded, its logits
    # finite, compared with the source's): the source model is then loaded once a run, for the
    # reference the next artifact reuses. The held-out calibration sample is compared only
    # without one (--no-eval).
    samples = None if weights_only or chunks else load_samples(job.text, tokenizer, Path(job.model))
    batches = [row.unsqueeze(0) for row in samples.ids] if samples is not None else []
    key = "ids-" + hf_eval.ids_sha256(chunks)[:32] if chunks else ""
    evaluation: dict[str, Any] | None = None
    stats: dict[str, Any] = {}
    with torch.inference_mode():
        eval_ref = hf_eval.load_reference(job.reference_cache, key) if chunks else None
        if batches or (chunks and eval_ref is None):
            reference = _load(job.model, device, quantized=False, trust=job.trust_remote_code)
            ref_logprobs = [_logprobs(reference, ids, device, "reference") for ids in batches]
            if chunks and eval_ref is None:  # once per run: the next artifact reuses it
                eval_ref = hf_eval.scored_logprobs(reference, chunks, device, "reference")
                hf_eval.save_reference(job.reference_cache, key, eval_ref)
            del reference
            gc.collect()
        quantized = _load(job.quantized, device, quantized=True, trust=job.trust_remote_code)
        if batches:
            stats = _compare(quantized, batches, ref_logprobs, device)
        if chunks:
            got = hf_eval.scored_logprobs(quantized, chunks, device, "quantized")
            evaluation = {**hf_eval.figures(eval_ref, got, hf_eval.targets(chunks), job.eval_ctx),
                          "ids_sha256": hf_eval.ids_sha256(chunks), "chunks": len(chunks)}
            if not batches:
                stats = {"kl_divergence": evaluation["kld_mean"], "tokens": evaluation["tokens"], "finite": True,
                         "top1_agreement": evaluation["top1_agreement"]}
    metadata = {**stats, "eval": evaluation, "text": samples.metadata if samples is not None else None,
                "device": device, "versions": versions("gptqmodel", "optimum"),
                "seconds": round(time.monotonic() - started, 3)}
    files = [] if weights_only else artifact.list_files(Path(job.quantized))
    p.emit(p.Result(output_dir=job.quantized, files=files, metadata=metadata))


def _load(path: str, device: str, *, quantized: bool, trust: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.float16
    where = Path(path)
    # a GGUF file is dequantized by transformers' GGUF loader (gguf-py) into the same model class
    source, extra = (str(where.parent), {"gguf_file": where.name}) if where.suffix == ".gguf" else (path, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device,
                                                     trust_remote_code=trust, **extra)
    except Exception as exc:
        if not quantized:
            raise
        raise WorkerError("unsupported" if extra else "validation", f"the artifact does not load with transformers: "
                          f"{type(exc).__name__}: {exc}") from exc
    p.emit(p.Progress(stage="validate", done=1, total=1,
                      unit="quantized model" if quantized else "reference model"))
    return model.eval()


def _logprobs(model: Any, ids: Any, device: str, which: str) -> Any:
    import torch

    logits = model(ids.to(device)).logits[0].float()
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise WorkerError("validation", f"the {which} model produced {bad} non-finite logits",
                          hint="The artifact is broken; try another backend, more calibration "
                               "samples or more bits." if which == "quantized" else None)
    return torch.log_softmax(logits, dim=-1).cpu()


def _compare(model: Any, batches: list[Any], ref_logprobs: list[Any], device: str) -> dict[str, Any]:
    kl_sum = agree = tokens = 0.0
    nll_ref = nll_q = 0.0
    for ids, ref in zip(batches, ref_logprobs, strict=True):
        got = _logprobs(model, ids, device, "quantized")
        kl_sum += float((ref.exp() * (ref - got)).sum())
        agree += float((ref.argmax(-1) == got.argmax(-1)).sum())
        tokens += ref.shape[0]
        targets = ids[0, 1:]
        nll_ref -= float(ref[:-1].gather(-1, targets[:, None]).sum())
        nll_q -= float(got[:-1].gather(-1, targets[:, None]).sum())
    predicted = tokens - len(batches)
    return {"kl_divergence": kl_sum / tokens, "tokens": int(tokens), "finite": True,
            "top1_agreement": agree / tokens,
            "perplexity_reference": math.exp(nll_ref / predicted),
            "perplexity_quantized": math.exp(nll_q / predicted)}


if __name__ == "__main__":
    run(p.ValidateJob, main, backend="gptqmodel")
