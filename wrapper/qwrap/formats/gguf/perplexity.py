"""llama-perplexity as GGUF's steps run it: the 16-bit reference (``--kl-divergence-base``
written from a text) and the KL divergence of a quantized file against it, repeated until the
tool prints its result (``quality.PERPLEXITY_ATTEMPTS``). The evaluation, the 16-bit reference,
the sensitivity probes and the stock file of a size budget all measure through here."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ...children import LineParser
from ...context import StepContext
from ...errors import UsageError, ValidationFailedError
from ...quality import PERPLEXITY_ATTEMPTS, parse_base_ppl, parse_kld_summary
from ...supervisor import ProcessResult
from ...toolchain import Toolchain

T = TypeVar("T")
Argv = list[str | os.PathLike[str]]


def offload(tools: Toolchain) -> list[str]:
    """A CUDA build runs every layer on the GPU (the imatrix, the validation, the evaluation);
    a CPU build takes no such flag."""
    return ["-ngl", "999"] if tools.variant == "cuda" else []


def argv(tools: Toolchain, model: Path, ctx_len: int, chunks: int, threads: int) -> Argv:
    """``model`` measured on ``chunks`` chunks of ``ctx_len`` tokens (one batch a chunk)."""
    return [tools.tool("llama-perplexity"), "-m", model, "-c", str(ctx_len), "--chunks", str(chunks),
            "-t", str(threads), "-b", str(ctx_len), *offload(tools)]


def measure(ctx: StepContext, command: Argv, what: str, parse: Callable[[Sequence[str]], T], *,
            short_text: UsageError | None = None, parser: LineParser | None = None) -> tuple[T, ProcessResult]:
    """Run ``command`` until ``parse`` finds its result in the output's tail (it raises
    ValueError when the summary is missing: the pinned build sometimes exits 0 without its last
    lines). ``short_text`` is raised when the text holds fewer than two chunks."""
    for attempt in range(1, PERPLEXITY_ATTEMPTS + 1):
        result = ctx.run_tool(command, what=what, parser=parser)
        if short_text is not None and any("you need at least" in line for line in result.tail):
            raise short_text
        try:
            return parse(result.tail), result
        except ValueError as exc:
            if attempt == PERPLEXITY_ATTEMPTS:
                raise ValidationFailedError(f"{what} printed no result in {attempt} runs: {exc}",
                                            hint=f"See {result.log_path}.") from exc
            ctx.warning(f"{what} ended without its result (run {attempt} of {PERPLEXITY_ATTEMPTS}); measuring again")
    raise AssertionError("unreachable")


def write_base(ctx: StepContext, command: Argv, text: str, base: Path, what: str, short_text: UsageError,
               parser: LineParser | None = None) -> tuple[float, ProcessResult]:
    """Write the 16-bit reference ``base`` (logits of every chunk of ``text``): its perplexity."""
    return measure(ctx, [*command, "-f", text, "--kl-divergence-base", base], what, parse_base_ppl,
                   short_text=short_text, parser=parser)


def kld(ctx: StepContext, command: Argv, base: Path, what: str) -> tuple[dict[str, float], ProcessResult]:
    """The KL divergence (and the other figures of its summary) against the reference ``base``."""
    return measure(ctx, [*command, "--kl-divergence-base", base, "--kl-divergence"], what, parse_kld_summary)
