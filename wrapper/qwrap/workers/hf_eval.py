"""The run's evaluation chunks scored in transformers: the same token ids llama.cpp scores.

The ids come from llama-perplexity's base file when the run makes GGUF (its header holds the
tokenized text: ``_logits_``, n_ctx, n_vocab, n_chunk as int32, then n_ctx x n_chunk int32 ids),
else from the source tokenizer: ``tokenizer(text, add_special_tokens=False)`` with BOS first.
Either way they are cut as llama-perplexity does: consecutive chunks of ``ctx`` tokens, the first
of each set to BOS, the logits at positions ctx/2 .. ctx-2 scored against the next token.

The source model's log-probs on those positions are computed once per run and kept in a
safetensors file (``reference_cache``); every AWQ/GPTQ artifact is compared with them.
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Any

from qwrap.workers import protocol as p
from qwrap.workers.runtime import WorkerError


def chunk_ids(job: p.ValidateJob, tokenizer: Any) -> list[list[int]]:
    """The evaluation chunks as token ids (BOS first in each)."""
    ctx = job.eval_ctx
    if job.eval_source_kind == "llama-kld":
        ids, file_ctx = _kld_tokens(Path(str(job.eval_source)))
        if file_ctx != ctx:
            raise WorkerError("bad_job", f"the base file has chunks of {file_ctx} tokens, not {ctx}")
    else:
        text = Path(str(job.eval_source)).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
    n_chunks = min(job.eval_chunks, len(ids) // ctx)
    if n_chunks < 1:
        raise WorkerError("bad_job", f"the evaluation text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    bos = tokenizer.bos_token_id
    chunks = []
    for i in range(n_chunks):
        chunk = list(ids[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def _kld_tokens(path: Path) -> tuple[list[int], int]:
    try:
        n_ctx, _n_vocab, n_chunk = p.llama_kld_header(path)
    except ValueError as exc:
        raise WorkerError("bad_job", str(exc)) from None
    with path.open("rb") as f:
        f.seek(20)
        raw = f.read(4 * n_ctx * n_chunk)
    if len(raw) != 4 * n_ctx * n_chunk:
        raise WorkerError("bad_job", f"{path} is truncated")
    return list(struct.unpack(f"<{n_ctx * n_chunk}i", raw)), n_ctx


def ids_sha256(chunks: list[list[int]]) -> str:
    return hashlib.sha256(struct.pack(f"<{sum(map(len, chunks))}i", *[t for c in chunks for t in c])).hexdigest()


def scored_logprobs(model: Any, chunks: list[list[int]], device: str, which: str) -> Any:
    """log-softmax at the scored positions of every chunk, stacked: [positions, vocab] f32."""
    import torch

    parts = []
    for chunk in chunks:
        ids = torch.tensor([chunk], device=device)
        first = len(chunk) // 2
        logits = model(ids).logits[0, first:len(chunk) - 1].float()
        if not torch.isfinite(logits).all():
            raise WorkerError("validation", f"the {which} model produced non-finite logits on the evaluation text")
        parts.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(parts)


def targets(chunks: list[list[int]]) -> Any:
    import torch

    return torch.tensor([t for c in chunks for t in c[len(c) // 2 + 1:]])


def load_reference(path: str | None, key: str) -> Any:
    if path is None or not Path(path).is_file():
        return None
    from safetensors.torch import load_file

    data = load_file(path)
    return data["logprobs"] if key in data else None


def save_reference(path: str | None, key: str, logprobs: Any) -> None:
    if path is None:
        return
    import torch
    from safetensors.torch import save_file

    tmp = Path(path).with_suffix(".partial")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"logprobs": logprobs.contiguous(), key: torch.zeros(1)}, str(tmp))
    tmp.replace(path)


def _mean_se(x: Any) -> tuple[float, float]:
    """The mean of per-position values and its standard error, as llama-perplexity's
    ``mean_and_uncertainty``: sqrt(population variance / (n - 1)), i.e. the sample standard
    deviation over sqrt(n); 0 for ten positions or fewer."""
    n = int(x.shape[0])
    mean = float(x.mean())
    var = float(((x - mean) ** 2).mean())
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _covariance(a: Any, b: Any) -> float:
    """The covariance of the means of two per-position series (llama-perplexity's ``covariance``)."""
    n = int(a.shape[0])
    if n < 10:
        return 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean()) / (n - 1)


def figures(ref: Any, got: Any, tgt: Any, ctx: int) -> dict[str, Any]:
    """The quality figures of ``got`` against ``ref`` (log-probs at the same positions), each with
    its standard error computed as llama-perplexity computes it (see quality.py): the mean KLD's
    from the per-position KLDs, PPL's by the delta method on the mean negative log-likelihood
    (PPL x its standard error), ΔPPL's from the paired difference (both variances less twice the
    covariance of the two mean NLLs), the top-1 agreement's as a binomial share. The p99 has none."""
    import torch

    n = int(ref.shape[0])
    kld = (ref.exp() * (ref - got)).sum(-1).double()
    nll_ref = -ref.gather(-1, tgt[:, None])[:, 0].double()
    nll_got = -got.gather(-1, tgt[:, None])[:, 0].double()
    kld_mean, kld_se = _mean_se(kld)
    mean_ref, se_ref = _mean_se(nll_ref)
    mean_got, se_got = _mean_se(nll_got)
    ppl_base, ppl = math.exp(mean_ref), math.exp(mean_got)
    ppl_base_se, ppl_se = ppl_base * se_ref, ppl * se_got
    cov = ppl * ppl_base * _covariance(nll_got, nll_ref)
    top1 = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
    return {"kld_mean": kld_mean, "kld_mean_se": kld_se, "kld_p99": float(torch.quantile(kld.float(), 0.99)),
            "ppl": ppl, "ppl_se": ppl_se, "ppl_base": ppl_base, "ppl_base_se": ppl_base_se,
            "delta_ppl": ppl - ppl_base, "delta_ppl_se": math.sqrt(max(ppl_se**2 + ppl_base_se**2 - 2 * cov, 0.0)),
            "top1_agreement": top1, "top1_agreement_se": math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0,
            "tokens": n, "ctx": ctx, "runtime": "transformers", "weights": None}
