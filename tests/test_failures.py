"""The failure table on real output: each tests/data/failures/CASE.log is what the pinned
tools printed for a real broken tiny model (recorded by scripts/record-tool-failures); the
error is one sentence naming the problem, the tool's own lines below it, the log path in the
hint, and a documented exit code (never 1 or a bare 10 for these)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_qwrap
from qwrap.errors import ModelFilesError, StepFailedError, UnsupportedModelError
from qwrap.failures import error_for, python_exception
from qwrap.supervisor import ProcessResult

DATA = REPO / "tests" / "data" / "failures"


def recorded(case: str) -> ProcessResult:
    path = DATA / f"{case}.log"
    return ProcessResult(argv=("tool",), returncode=1, seconds=1.0, peak_rss_bytes=0, log_path=path,
                         tail=tuple(path.read_text().splitlines()))


@pytest.mark.parametrize(("case", "cls", "sentence", "tool_line"), [
    ("gpt2-n_ctx", UnsupportedModelError,
     "the pinned converter failed on this model: KeyError 'n_ctx' in conversion/gpt2.py (set_gguf_parameters)",
     "KeyError: 'n_ctx'"),
    ("unmapped-tensor", UnsupportedModelError,
     "the pinned converter cannot map tensor model.layers.0.mlp.gate_proj.weight to a GGUF name",
     "ValueError: Can not map tensor"),
    ("missing-tensor", ModelFilesError,
     "the model lacks a weight llama.cpp needs: GGUF tensor output_norm.weight is not in the converted file",
     "check_tensor_dims: tensor 'output_norm.weight' not found"),
    ("wrong-shape", ModelFilesError,
     "shape mismatch: GGUF tensor blk.0.attn_q.weight has shape [512, 128] but config.json's sizes give [256, 256]",
     "has wrong shape"),
    ("vocab-mismatch", ModelFilesError,
     "vocabulary size mismatch: config.json says vocab_size 5000 but the token embedding has 4096 rows",
     "token_embd.weight' has wrong shape"),
])
def test_recorded_failures_in_one_sentence(case: str, cls: type, sentence: str, tool_line: str) -> None:
    err = error_for(recorded(case), "the tool")
    assert type(err) is cls
    first, *below = err.message.splitlines()
    assert first.startswith(sentence), first
    assert any(tool_line in line for line in below), below  # the relevant lines stay below it
    assert err.log_path == str(DATA / f"{case}.log") and err.hint and err.log_path in err.hint
    assert err.exit_code not in (1, StepFailedError.exit_code)


def test_a_traceback_outside_the_converter_names_the_last_frame() -> None:
    tail = ["noise", "Traceback (most recent call last):", '  File "/x/lib/foo.py", line 3, in <module>',
            "    bar()", '  File "/x/lib/bar.py", line 9, in bar', "    raise RuntimeError('boom: 1')",
            "RuntimeError: boom: 1"]
    assert python_exception(tail) == ("RuntimeError", "boom: 1", "bar.py", "bar")
    err = error_for(ProcessResult(("t",), 1, 0.0, 0, None, tuple(tail)), "the calibration conversion")
    assert type(err) is StepFailedError
    assert err.message.startswith("the calibration conversion failed: RuntimeError boom: 1 in bar.py (bar)")


def test_chained_tracebacks_report_the_last_one() -> None:
    tail = ["Traceback (most recent call last):", '  File "/a/conversion/base.py", line 1, in f', "KeyError: 'a'",
            "", "During handling of the above exception, another exception occurred:", "",
            "Traceback (most recent call last):", '  File "/a/conversion/llama.py", line 2, in g',
            "ValueError: bad"]
    assert python_exception(tail) == ("ValueError", "bad", "conversion/llama.py", "g")


@pytest.mark.slow
def test_gpt2_config_without_n_ctx_end_to_end(convert_python: Path, tmp_path: Path) -> None:
    """A transformers GPT-2 (n_positions, no n_ctx): `qwrap run` exits 6 with the sentence and
    the converter log's path, and that log holds the traceback."""
    model = tmp_path / "gpt2"
    subprocess.run([str(convert_python), "-c",
                    "import sys, torch; from transformers import GPT2Config, GPT2LMHeadModel; torch.manual_seed(0); "
                    "GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2))"
                    ".save_pretrained(sys.argv[1])", str(model)], check=True, capture_output=True)
    out = tmp_path / "out"
    proc = run_qwrap("run", str(model), "-q", "Q8_0", "-o", str(out), "--no-eval", "--json")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == UnsupportedModelError.exit_code, proc.stderr
    assert "the pinned converter failed on this model: KeyError 'n_ctx' in conversion/gpt2.py" in text
    log = out / ".checkpoint" / "logs" / "gguf.convert.log"
    assert str(log) in text and "KeyError: 'n_ctx'" in log.read_text()
    assert json.loads((out / ".checkpoint" / "journal.jsonl").read_text().splitlines()[-1])["state"] == "failed"
