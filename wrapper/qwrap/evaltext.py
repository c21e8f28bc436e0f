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
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

EVAL_SHARE = 0.25  # the default budget: the evaluation's share of the run's estimated time
MAX_DEFAULT_TOKENS = 16384
MIN_CHUNKS = 2
# A forward pass in float32 torch, seconds per (1e9 parameters x tokens): measured on 2 CPU
# cores (a 100M Llama, 512-token chunks); a CUDA GPU does it ~50x faster.
TORCH_S_PER_GTOKEN_PARAM = 0.045
TORCH_GPU_SPEEDUP = 50.0


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
