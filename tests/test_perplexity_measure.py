"""Every measuring step runs llama-perplexity through ``formats/gguf/perplexity.measure``: the
pinned build sometimes exits 0 without its last lines, so a run without its result is repeated
(``PERPLEXITY_ATTEMPTS``) with a warning each time, and a text too short for two chunks is the
user's error at once. Tested with a real executable that replays the tool's recorded output,
cut as the real failure cuts it, for a set number of runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qwrap.context import StepContext
from qwrap.errors import UsageError, ValidationFailedError
from qwrap.formats.gguf import perplexity
from qwrap.quality import PERPLEXITY_ATTEMPTS, parse_base_ppl, parse_kld_summary
from test_fallback import Warnings  # a reporter that keeps the warnings

RECORDED = Path(__file__).parent / "data" / "recorded"

REPLAY = """#!{python}
import sys
from pathlib import Path
runs = Path(sys.argv[1])
n = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(n))
lines = Path(sys.argv[2]).read_text().splitlines()
if sys.argv[3] == "short":
    print("perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512")
    sys.exit(0)  # as the pinned tool does
whole = n > int(sys.argv[3])
print("\\n".join(lines if whole else lines[:len(lines) // 2]))
"""


def replay(tmp_path: Path, log: str, cut_runs: int | str) -> tuple[list[str | Path], Path]:
    script = tmp_path / "llama-perplexity"
    script.write_text(REPLAY.format(python=sys.executable))
    script.chmod(0o755)
    runs = tmp_path / "runs"
    return [script, runs, RECORDED / log, str(cut_runs)], runs


def context(tmp_path: Path) -> tuple[StepContext, Warnings]:
    reporter = Warnings()
    return StepContext("gguf.eval:Q4_K_M", tmp_path / "out", reporter, stall_timeout=30), reporter


def test_a_run_without_its_summary_is_repeated_until_it_prints_one(tmp_path: Path) -> None:
    command, runs = replay(tmp_path, "llama-perplexity-kld.log", 2)
    ctx, reporter = context(tmp_path)
    figures, result = perplexity.measure(ctx, command, "llama-perplexity Q4_K_M", parse_kld_summary)
    assert runs.read_text() == "3" and len(reporter.seen) == 2
    assert figures == parse_kld_summary((RECORDED / "llama-perplexity-kld.log").read_text().splitlines())
    assert "run 2 of" in reporter.seen[1] and result.log_path == ctx.log_path


def test_no_result_in_every_run_is_a_validation_failure_naming_the_log(tmp_path: Path) -> None:
    command, runs = replay(tmp_path, "llama-perplexity-base.log", PERPLEXITY_ATTEMPTS)
    ctx, reporter = context(tmp_path)
    with pytest.raises(ValidationFailedError) as caught:
        perplexity.measure(ctx, command, "llama-perplexity (16-bit reference)", parse_base_ppl)
    assert runs.read_text() == str(PERPLEXITY_ATTEMPTS) and len(reporter.seen) == PERPLEXITY_ATTEMPTS - 1
    assert "printed no result" in caught.value.message and str(ctx.log_path) in (caught.value.hint or "")


def test_a_text_too_short_for_two_chunks_is_the_users_error_at_once(tmp_path: Path) -> None:
    command, runs = replay(tmp_path, "llama-perplexity-base.log", "short")
    ctx, _ = context(tmp_path)
    short = UsageError("the evaluation text is too short", hint="Pass a longer --eval-text.")
    with pytest.raises(UsageError) as caught:
        perplexity.measure(ctx, command, "llama-perplexity (16-bit reference)", parse_base_ppl,
                           short_text=short)
    assert caught.value is short and runs.read_text() == "1"
