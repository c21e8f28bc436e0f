"""The evaluation text and its chunking, chosen once per run so every runtime scores the same
tokens.

The text is ``--eval-text FILE`` (.txt, documents separated by blank lines, or .jsonl), else
WikiText-2's *test* split (cached through the Hub client). Offline without either, the run
evaluates on the held-out part of ``--calib`` (every 10th document, which calibration never
sees) and says so. It is cut as llama-perplexity does: tokenized once with BOS, consecutive
chunks of ``ctx`` tokens, the first token of each set to BOS, the second half scored.

``--eval-tokens`` bounds the cost (tokens processed = chunks x ctx). Its default follows the
model's size: about 1.6e12 parameter-tokens (16k tokens for a 100M model, 2k for 1B, the
minimum of two chunks from 8B up), so the evaluation stays a modest share of the run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

PARAMETER_TOKENS = 1.6e12  # the default budget: parameters x evaluated tokens
MAX_DEFAULT_TOKENS = 16384
MIN_CHUNKS = 2


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


def chunks_for(parameters: int, ctx: int, tokens: int) -> int:
    """How many chunks ``--eval-tokens`` (0: the size-based default) buys."""
    if tokens <= 0:
        tokens = min(MAX_DEFAULT_TOKENS, int(PARAMETER_TOKENS / max(parameters, 1)))
    return max(MIN_CHUNKS, tokens // ctx)


def from_file(path: Path, ctx: int, chunks: int) -> Evaluation:
    from .journal import sha256_file

    return Evaluation(f"sha256:{sha256_file(path)}", path.name, str(path), ctx, chunks)


def wikitext_test(ctx: int, chunks: int, *, token: str | None, fetch: bool) -> Evaluation:
    """WikiText-2's test split, converted to text once in the cache. Raises OfflineError."""
    from . import calib_source

    identity = f"hf-dataset:{calib_source.WIKITEXT_REPO}/{calib_source.TEST_FILE}"
    if fetch:
        return Evaluation(identity, "wikitext2 (test)", str(calib_source.wikitext2_text("test", token=token)),
                          ctx, chunks)
    text = calib_source.planned_text("test")  # None: `run` downloads it, so the plan is the same
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
        raise UsageError("--eval-tokens must be 0 (sized to the model) or a positive number")
    if eval_text is not None and not Path(eval_text).is_file():
        raise UsageError(f"--eval-text file {eval_text} does not exist",
                         hint="Pass a UTF-8 .txt or .jsonl file, or leave --eval-text out for WikiText-2 (test).")
