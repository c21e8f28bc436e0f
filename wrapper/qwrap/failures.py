"""A failed child process -> the right qwrap error, with what to do next.

An ordered table of patterns over the child's output (the most specific first), in the
spirit of huggingface_hub's CLI error table: the message says what happened, the hint what
the user can do, and the full log path is always attached.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Sequence

from .errors import (
    InsufficientDiskError,
    OutOfMemoryError,
    QwrapError,
    StalledError,
    StepFailedError,
    ToolKilledError,
    UnsupportedModelError,
)
from .supervisor import ProcessResult, relevant_lines

_Factory = Callable[[re.Match[str], str], QwrapError]

PATTERNS: Sequence[tuple[re.Pattern[str], _Factory]] = (
    (
        re.compile(r"BPE pre-tokenizer was not recognized"),
        lambda m, log: UnsupportedModelError(
            "the pinned llama.cpp converter does not recognise this model's BPE pre-tokenizer "
            "(it identifies pre-tokenizers by a hash of known vocabularies; new model families "
            "need a converter update)",
            hint="Use a llama.cpp build that knows this model (set QWRAP_LLAMA_CPP_DIR to it), "
            "or a Llama/SentencePiece-tokenizer variant of the model. "
            f"Converter log: {log}",
        ),
    ),
    (
        re.compile(r"Model (\S+) is not supported"),
        lambda m, log: UnsupportedModelError(
            f"architecture {m[1]} is not supported by the pinned llama.cpp converter",
            hint="Check `qwrap formats --architectures` for what is supported; a newer "
            f"llama.cpp may add it (QWRAP_LLAMA_CPP_DIR). Converter log: {log}",
        ),
    ),
    (
        re.compile(r"No space left on device|ENOSPC|failed to write|Disk quota exceeded", re.I),
        lambda m, log: InsufficientDiskError(
            "the disk filled up while writing", hint=f"Free space and run the same command again. Log: {log}"
        ),
    ),
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError|std::bad_alloc|Cannot allocate memory|MemoryError"),
        lambda m, log: OutOfMemoryError("the tool ran out of memory", hint=f"Log: {log}"),
    ),
)


def oom_hint(peak_rss: int, extra: str = "") -> str:
    gib = peak_rss / 2**30
    return (
        f"Peak memory of the step's processes was {gib:.1f} GiB. Try fewer --threads, "
        f"{extra + ', ' if extra else ''}or a machine with more memory; then run the same "
        "command again: finished steps are kept."
    )


def error_for(result: ProcessResult, what: str, *, oom_extra: str = "") -> QwrapError:
    """Explain why ``what`` (e.g. 'llama-quantize Q4_K_M') failed."""
    log = str(result.log_path) if result.log_path else "(no log)"
    shown = "\n  ".join(relevant_lines(result.tail))
    if result.stalled:
        return StalledError(
            f"{what} produced no output for too long and was stopped",
            hint=f"Raise --stall-timeout if the step is just slow, or look at {log}.",
            log_path=log,
        )
    if result.oom_killed:
        return OutOfMemoryError(
            f"{what} was killed by the kernel: out of memory",
            hint=oom_hint(result.peak_rss_bytes, oom_extra),
            log_path=log,
        )
    text = "\n".join(result.tail)
    for pattern, factory in PATTERNS:
        m = pattern.search(text)
        if m:
            err = factory(m, log)
            if isinstance(err, OutOfMemoryError):
                err.hint = oom_hint(result.peak_rss_bytes, oom_extra) + f" Log: {log}"
            err.log_path = log
            return err
    if result.killed_by is not None:
        name = signal.Signals(result.killed_by).name
        return ToolKilledError(
            f"{what} was killed by {name} (from outside qwrap)",
            hint=f"Run the same command again to continue. Output so far: {log}",
            log_path=log,
        )
    return StepFailedError(
        f"{what} failed (exit code {result.returncode}):\n  {shown}",
        hint=f"Full log: {log}",
        log_path=log,
    )
