"""The evaluation text and its chunking, chosen once per run so every runtime scores the same
tokens.

The text is ``--eval-text FILE`` (.txt, documents separated by blank lines, or .jsonl), else
WikiText-2's *test* split (cached through the Hub client, when ``calib_source.unavailable``
says it can be had). Without either, the run evaluates on the held-out part of ``--calib``
(every 10th document, which calibration never sees) and says so. It is cut as llama-perplexity
does: tokenized once with BOS, consecutive chunks of ``ctx`` tokens, the first token of each
set to BOS, the second half scored.

``--eval-tokens`` bounds the cost (tokens processed = chunks x ctx). Its default is sized to
the run on the machine at hand: as many chunks as keep the evaluation steps' estimated time at
most a quarter of the whole run's (``EVAL_SHARE``; the plan's own cost models, so the device
and the model size count), at least two chunks and at most 16384 tokens. On a CPU, scoring a
token costs about as much as quantizing it several times over, so the default is the minimum
there whatever the size; with a GPU it grows to the 16k cap.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

EVAL_SHARE = 0.25  # the default budget: the evaluation's share of the run's estimated time
MAX_DEFAULT_TOKENS = 16384
MIN_CHUNKS = 2
# A forward pass in float32 torch, seconds per (1e9 parameters x tokens): measured on 2 CPU
# cores (a 100M Llama, 512-token chunks); a CUDA GPU does it ~50x faster.
TORCH_S_PER_GTOKEN_PARAM = 0.045
TORCH_GPU_SPEEDUP = 50.0
# How precise the evaluation will be, said by `plan` before anything runs: the standard error
# of a mean KLD over n scored tokens is the per-token KLDs' standard deviation over sqrt(n), and
# that standard deviation is about KLD_SPREAD times their mean (a few positions differ much,
# most hardly at all), so SE ~ KLD_SPREAD x KLD / sqrt(n) at any KLD. Measured (SE x sqrt(n) /
# mean, from llama-perplexity's own "Mean KLD: m ± se"): 2.0-3.3 (median 2.4) over Q6_K..Q2_K
# of the trained tiny Llama on held-out text (1,397 tokens), 2.0-6.0 (median 2.8) over
# Q8_0..IQ2_XS on 8,160 tokens of its calibration text; 1.5-3.1 in transformers (hf_eval, the
# weights view of Q8_0..Q4_K_S on the 1,397 held-out tokens);
# published llama.cpp runs on 7B-class models give 2.5-3.3. An untrained (random) model's
# KLDs are far more even (0.1-0.5): not what a real model does. 3 errs towards the wide side.
KLD_SPREAD = 3.0
REFERENCE_KLD = 0.01  # the KLD `plan` states the error at without a --max-kld: about a 5-bit file's


@dataclass(frozen=True)
class Evaluation:
    identity: str  # what the text is, for fingerprints: "sha256:<hex>" or the dataset file
    label: str  # for people: the file name, "wikitext2 (test)", "held-out part of X"
    path: str | None  # the text file (None in `plan` while it is not fetched yet)
    ctx: int
    chunks: int
    note: str = ""  # why this text was chosen, when it was not the user's choice

    @property
    def tokens(self) -> int:
        return self.ctx * self.chunks

    @property
    def scored(self) -> int:
        """Positions scored: the second half of every chunk but its last token."""
        return self.chunks * (self.ctx - 1 - self.ctx // 2)


def kld_standard_error(kld: float, scored: int) -> float:
    """The standard error a mean KLD of ``kld`` will have over ``scored`` tokens (KLD_SPREAD)."""
    return KLD_SPREAD * kld / math.sqrt(max(scored, 1))


def precision(scored: int, klds: Sequence[float] = ()) -> dict[str, Any]:
    """How precise an evaluation scoring ``scored`` tokens will be, for `plan` (``--json``): the
    mean KLD's expected standard error relative to the KLD, and in absolute terms at each of
    ``klds`` (the --max-kld limits; REFERENCE_KLD without one)."""
    at = sorted(set(klds)) or [REFERENCE_KLD]
    return {"tokens_scored": scored, "kld_spread": KLD_SPREAD,
            "kld_relative_se": round(KLD_SPREAD / math.sqrt(max(scored, 1)), 6),
            "kld_se_at": [{"kld": k, "se": kld_standard_error(k, scored)} for k in at]}


def planned_precision(ev: Evaluation | None, max_kld: Sequence[str]) -> dict[str, Any] | None:
    """``precision`` of a planned evaluation, at its --max-kld limits (None without evaluation)."""
    if ev is None:
        return None
    from .quality import parse_gates

    gates = parse_gates(max_kld)
    limits = [k for k in (gates.default, *(v for _, v in gates.by_name)) if k is not None]
    return {**precision(ev.scored, limits), "at_limits": bool(limits)}


def precision_text(doc: dict[str, Any]) -> str:
    """``precision``'s document as `plan` prints it."""
    at = doc["kld_se_at"]
    which = ("the --max-kld limit" + ("s" if len(at) > 1 else "")) if doc.get("at_limits") else "about a 5-bit file's KLD"
    values = ", ".join(f"± {e['se']:.2g} at {e['kld']:g}" for e in at)
    return (f"{doc['tokens_scored']:,} tokens will be scored: a mean KLD's standard error is about "
            f"{100 * doc['kld_relative_se']:.2g}% of it ({doc['kld_spread']:g} x KLD / sqrt(tokens)), {values} "
            f"({which}); two files closer than about 2.8 standard errors are within noise (more --eval-tokens "
            "narrows it)")


def chunks_for(ctx: int, tokens: int) -> int:
    """How many chunks ``--eval-tokens`` buys (0, the default: ``MIN_CHUNKS`` until
    ``default_chunks`` sizes it to the plan)."""
    return max(MIN_CHUNKS, tokens // ctx) if tokens > 0 else MIN_CHUNKS


def default_chunks(build_s: float, fixed_s: float, per_chunk_s: float, ctx: int) -> int:
    """The most chunks whose evaluation (``fixed_s + chunks x per_chunk_s``) stays within
    ``EVAL_SHARE`` of the run (``build_s`` + the evaluation), clamped to [MIN_CHUNKS, 16384 tokens]."""
    most = max(MIN_CHUNKS, MAX_DEFAULT_TOKENS // ctx)
    if per_chunk_s <= 0:
        return most
    fits = (EVAL_SHARE / (1 - EVAL_SHARE) * build_s - fixed_s) / per_chunk_s
    return int(min(most, max(MIN_CHUNKS, fits)))


def torch_seconds(parameters: int, tokens: int, *, gpu: bool) -> float:
    """One forward pass of the model over ``tokens`` in float32 torch (the transformers side)."""
    seconds = TORCH_S_PER_GTOKEN_PARAM * parameters / 1e9 * tokens
    return seconds / TORCH_GPU_SPEEDUP if gpu else seconds


def from_file(path: Path, ctx: int, chunks: int) -> Evaluation:
    from .journal import sha256_file

    return Evaluation(f"sha256:{sha256_file(path)}", path.name, str(path), ctx, chunks)


def wikitext_test(ctx: int, chunks: int, *, token: str | None, fetch: bool) -> Evaluation:
    """WikiText-2's test split, converted to text once in the cache (the caller has asked
    ``calib_source.unavailable("test")`` first). Raises OfflineError when the download fails."""
    from . import calib_source

    identity = f"hf-dataset:{calib_source.WIKITEXT_REPO}/{calib_source.TEST_FILE}"
    if fetch:
        return Evaluation(identity, "wikitext2 (test)", str(calib_source.wikitext2_text("test", token=token)),
                          ctx, chunks)
    text = calib_source.cached_text("test")  # None: `run` downloads it, so the plan is the same
    return Evaluation(identity, "wikitext2 (test)", str(text) if text else None, ctx, chunks)


def held_out(calib: Path, ctx: int, chunks: int, work: Path | None) -> Evaluation | None:
    """The documents of ``calib`` that calibration does not use, written to ``work`` (the run's
    scratch folder; None in `plan`, which writes nothing). None when they are too short for two
    chunks (about 4 characters a token)."""
    from .workers.calib import portion, read_documents

    docs = read_documents(calib)
    if len(docs) < 10:  # every 10th document is held out: fewer and calibration would see it all
        return None
    text = "\n\n".join(portion(docs, "held_out")) + "\n"
    if len(text) < 4 * 2 * ctx:
        return None
    identity = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    path = None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        target = work / "eval-text.txt"
        if not target.is_file() or target.read_text() != text:
            tmp = target.with_suffix(f".{os.getpid()}.partial")  # several --step processes may write it at once
            tmp.write_text(text)
            tmp.replace(target)
        path = str(target)
    note = (f"no --eval-text and WikiText-2 (test) is not available: the artifacts are measured on the part of "
            f"{calib.name} that calibration did not use")
    return Evaluation(identity, f"held-out part of {calib.name}", path, ctx, chunks, note)


def overlap(eval_text: Path, calib: Path) -> int:
    """Documents of the evaluation text that calibration uses (hashed, whitespace-normalized)."""
    from .workers.calib import portion, read_documents

    def key(doc: str) -> str:
        return hashlib.sha1(" ".join(doc.split()).encode()).hexdigest()

    used = {key(d) for d in portion(read_documents(calib), "calibration")}
    return sum(1 for d in read_documents(eval_text) if key(d) in used)


def check_options(ctx: int, tokens: int, eval_text: str | None) -> None:
    if ctx < 16 or ctx % 2:
        raise UsageError(f"--eval-ctx {ctx} must be an even number of at least 16", hint="512 is the usual value.")
    if tokens < 0:
        raise UsageError("--eval-tokens must be 0 (sized to the run) or a positive number")
    if eval_text is not None and not Path(eval_text).is_file():
        raise UsageError(f"--eval-text file {eval_text} does not exist",
                         hint="Pass a UTF-8 .txt or .jsonl file, or leave --eval-text out for WikiText-2 (test).")
