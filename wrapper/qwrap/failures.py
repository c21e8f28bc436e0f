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
    ModelFilesError,
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
    # llama.cpp loading what the converter wrote from an inconsistent checkpoint
    (
        re.compile(r"tensor '([^']+)' not found"),
        lambda m, log: ModelFilesError(
            f"the model lacks a weight llama.cpp needs: GGUF tensor {m[1]} is not in the converted file "
            "(the source checkpoint has no tensor that maps to it)",
            hint=f"Check that every shard of the model is there and complete, or that it is the architecture "
            f"config.json names. Log: {log}",
        ),
    ),
    (
        re.compile(r"tensor 'token_embd\.weight' has wrong shape; expected\s+(\d+),\s+(\d+), got\s+(\d+),\s+(\d+)"),
        lambda m, log: ModelFilesError(
            f"vocabulary size mismatch: config.json says vocab_size {m[2]} but the token embedding has "
            f"{m[4]} rows",
            hint=f"Set \"vocab_size\": {m[4]} in config.json (or use the checkpoint that matches it). Log: {log}",
        ),
    ),
    (
        re.compile(r"tensor '([^']+)' has wrong shape; expected\s+([\d, ]+?),\s+got\s+([\d, ]+)"),
        lambda m, log: ModelFilesError(
            f"shape mismatch: GGUF tensor {m[1]} has shape [{_dims(m[3])}] but config.json's sizes give "
            f"[{_dims(m[2])}]",
            hint=f"config.json does not describe these weights: use the config that came with them. Log: {log}",
        ),
    ),
    (
        re.compile(r"Can not map tensor '([^']+)'"),
        lambda m, log: UnsupportedModelError(
            f"the pinned converter cannot map tensor {m[1]} to a GGUF name: the weights are not those of "
            "the architecture config.json names, or a variant of it the converter does not know",
            hint=f"Check config.json's \"architectures\"; a newer llama.cpp may know this variant "
            f"(QWRAP_LLAMA_CPP_DIR). Converter log: {log}",
        ),
    ),
)


def _dims(text: str) -> str:
    """llama.cpp prints 4 dims padded with 1s: "256,    256,      1,      1" -> "256, 256"."""
    dims = [d.strip() for d in text.split(",") if d.strip()]
    while len(dims) > 1 and dims[-1] == "1":
        dims.pop()
    return ", ".join(dims)


_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+, in (\S+)')
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)|[A-Za-z_][\w.]*Error\w*)(?::\s?(.*))?$")
_LLAMA_FILE = re.compile(r"(?:^|/)((?:conversion|gguf-py/gguf|gguf)/[^/]+\.py|convert_hf_to_gguf\.py)$")


def python_exception(tail: Sequence[str]) -> tuple[str, str, str | None, str | None] | None:
    """The last Python traceback in ``tail``: (exception type, its message, the file it was
    raised in - the deepest frame in llama.cpp's converter when there is one - and its function)."""
    lines = [line.rstrip("\r\n") for line in tail]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    frames: list[tuple[str, str]] = []
    for line in lines[starts[-1] + 1:]:
        frame = _FRAME.match(line)
        if frame:
            frames.append((frame[1], frame[2]))
            continue
        found = _EXCEPTION.match(line)
        if found and frames:
            ours = [(_LLAMA_FILE.search(f), fn) for f, fn in frames]
            inside = [(m[1], fn) for m, fn in ours if m]
            where, func = inside[-1] if inside else (frames[-1][0].rsplit("/", 1)[-1], frames[-1][1])
            return found[1].rsplit(".", 1)[-1], (found[2] or "").strip(), where, func
    return None


def _from_traceback(tail: Sequence[str], what: str, log: str, shown: str) -> QwrapError | None:
    found = python_exception(tail)
    if found is None:
        return None
    kind, message, where, func = found
    sentence = f"{kind} {message}".strip() + (f" in {where}" if where else "") + (f" ({func})" if func else "")
    if where and _LLAMA_FILE.search(where):
        return UnsupportedModelError(
            f"the pinned converter failed on this model: {sentence}\n  {shown}",
            hint="The converter does not handle this model's config or weights; a newer llama.cpp may "
            f"(QWRAP_LLAMA_CPP_DIR). Converter log: {log}",
            log_path=log,
        )
    return StepFailedError(f"{what} failed: {sentence}\n  {shown}", hint=f"Full log: {log}", log_path=log)


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
            if isinstance(err, (ModelFilesError, UnsupportedModelError)):  # the tool's own words below
                err = type(err)(f"{err.message}\n  {shown}", hint=err.hint)
            err.log_path = log
            return err
    explained = _from_traceback(result.tail, what, log, shown) if result.killed_by is None else None
    if explained is not None:
        return explained
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
