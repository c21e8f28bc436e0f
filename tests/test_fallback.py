"""The fallback audit of every GGUF: llama-quantize gives a tensor whose rows do not take its
planned type's blocks another type (``tensor_type_fallback``), silently raising the size. Its
lines parsed from recorded real output (and in fragments, with other output between), the
planned and actual bits per weight, the warning; and end to end on a tiny model whose FFN width
(320) is not a multiple of 256."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import run_qwrap
from qwrap.context import NullReporter, StepContext
from qwrap.formats.gguf.actions import _fallback_audit
from qwrap.formats.gguf.ggmltypes import BY_ID, GGML_TYPES, file_bytes
from qwrap.ggufinfo import GGUFInfo, TensorInfo, read_info
from qwrap.journal import Journal
from qwrap.progress import Fallback, QuantizeProgress
from qwrap.toolchain import Toolchain

RECORDED = Path(__file__).parent / "data" / "recorded"


def lines(name: str) -> list[str]:
    """A recorded log as the supervisor delivers it: split on \\r and \\n."""
    text = (RECORDED / name).read_text(errors="replace")
    return [part for part in re.split(r"\r\n|\r|\n", text) if part.strip()]


# -- parsing -------------------------------------------------------------------------------------


def feed(parser: QuantizeProgress, stream: list[str]) -> QuantizeProgress:
    for line in stream:
        parser.feed(line)
    return parser


def test_dry_run_plans_every_tensor_and_its_fallbacks() -> None:
    p = feed(QuantizeProgress(), lines("llama-quantize-dry-run-fallbacks.log"))  # ffn320 at Q4_K_M
    assert p.fallbacks == [Fallback("blk.0.ffn_down.weight", "q4_K", "q5_0"),
                           Fallback("blk.1.ffn_down.weight", "q6_K", "q8_0")]
    assert p.fallback_count == 2 and p.done == 21
    assert len(p.stored) == 21 and p.stored["output_norm.weight"] == "f32" and p.stored["token_embd.weight"] == "f16"
    # what the dry run changes (after fallback); the norms it keeps are not planned
    assert len(p.planned) == 16 and not any("norm" in n for n in p.planned)
    assert p.planned["output.weight"] == "q6_K" and p.planned["blk.0.attn_q.weight"] == "q4_K"
    assert p.planned["blk.0.ffn_down.weight"] == "q5_0" and p.planned["blk.1.ffn_down.weight"] == "q8_0"


def test_a_real_run_reports_its_fallbacks() -> None:
    p = feed(QuantizeProgress(), lines("llama-quantize-Q3_K_S-fallbacks.log"))
    assert [f.to_json() for f in p.fallbacks] == [
        {"tensor": "blk.0.ffn_down.weight", "wanted": "q3_K", "got": "q4_0"},
        {"tensor": "blk.1.ffn_down.weight", "wanted": "q3_K", "got": "q4_0"}]
    assert p.fallback_count == 2 and p.done == 21 and p.planned == {}  # a real run prints no planned types
    clean = feed(QuantizeProgress(), lines("llama-quantize-Q4_K_M.log"))  # rows of 256 and 512: none
    assert clean.fallbacks == [] and clean.fallback_count is None and clean.done == 21


def test_fallback_lines_survive_fragments_and_interleaving() -> None:
    """Each warning is written in two or three parts; other output may come between them."""
    stream = [
        "warning: blk.0.ffn_down.weight                - ncols    320 not divisible by 256 (required for type    q4_K) ",
        "main: some stdout flushed in between",
        "-> falling back to    q5_0",
        # the third part, when the 32-weight fallback does not fit either
        "llama_model_loader: noise warning: blk.3.ffn_down.weight - ncols 300 not divisible by 256 (required for type "
        "q6_K) (WARNING: must use F16 due to unusual shape) -> falling back to     f16",
        "warning: a.weight - ncols 320 not divisible by 256 (required for type q2_K) ",
        "warning: b.weight - ncols 320 not divisible by 256 (required for type iq4_xs) ",
        "-> falling back to q4_0 -> falling back to iq4_nl",
        "-> falling back to q8_0",  # an end without a start: ignored
        "llama_model_quantize_impl: WARNING: 4 of 39 tensor(s) required fallback quantization",
    ]
    p = feed(QuantizeProgress(), stream)
    assert p.fallbacks == [Fallback("blk.0.ffn_down.weight", "q4_K", "q5_0"), Fallback("blk.3.ffn_down.weight", "q6_K", "f16"),
                           Fallback("a.weight", "q2_K", "q4_0"), Fallback("b.weight", "iq4_xs", "iq4_nl")]
    assert p.fallback_count == 4


def test_dry_run_lines_survive_fragments() -> None:
    stream = [
        "[   1/  21] output.weight                        - [   256,   4096,      1,      1], type =    f16, ",
        "ggml_something: unrelated",
        "size =     2.00 MiB ->     0.82 MiB (q6_K)",
        "[   2/  21] output_norm.weight - [   256,      1,      1,      1], type =    f32, size =    0.001 MiB",
        "[   3/  21] token_embd.weight - [   256,   4096,      1,      1], type =    f16, size =     2.00 MiB ->     "
        "0.56 MiB (q4_K)",
    ]
    p = feed(QuantizeProgress(), stream)
    assert p.planned == {"output.weight": "q6_K", "token_embd.weight": "q4_K"}
    assert p.stored == {"output.weight": "f16", "output_norm.weight": "f32", "token_embd.weight": "f16"}


def test_garbage_never_grows_the_parser() -> None:
    p = QuantizeProgress()
    for i in range(1000):
        p.feed(f"warning: t{i}.weight - ncols 3 not divisible by 32 (required for type q8_0) ")
        p.feed("\x1b[31m -> falling {{{ size = MiB type")
    assert len(p._pending) <= QuantizeProgress.MAX_PENDING and p.fallbacks == []


# -- the audit -----------------------------------------------------------------------------------


class Warnings(NullReporter):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def warning(self, message: str) -> None:
        self.seen.append(message)


def _audit(fallbacks: list[Fallback], types: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    shapes = {"token_embd.weight": (256, 4096), "blk.0.ffn_down.weight": (320, 256), "blk.0.ffn_up.weight": (256, 320)}
    tensors, offset = [], 0
    for name, shape in shapes.items():
        tensors.append(TensorInfo(name, shape, GGML_TYPES[types[name].lower()].id, offset))
        offset += GGML_TYPES[types[name].lower()].tensor_bytes(shape)
    info = GGUFInfo(3, {"general.architecture": "llama"}, tuple(tensors), data_offset=4096)
    size = file_bytes(info.data_offset, [(BY_ID[t.ggml_type], t.shape) for t in info.tensors])
    parser = QuantizeProgress()
    parser.fallbacks = fallbacks
    reporter = Warnings()
    facts = _fallback_audit(info, parser, size, "Q4_K_M", StepContext("gguf.quantize:Q4_K_M", Path("/out"), reporter))
    return {**facts, "size": size}, reporter.seen


def test_planned_and_actual_bits_per_weight() -> None:
    types = {"token_embd.weight": "q4_K", "blk.0.ffn_down.weight": "q8_0", "blk.0.ffn_up.weight": "q4_K"}
    facts, seen = _audit([Fallback("blk.0.ffn_down.weight", "q6_K", "q8_0")], types)
    params = 256 * 4096 + 2 * 320 * 256
    planned = facts["size"] - 320 * 256 * 34 / 32 + 320 * 256 * 210 / 256  # that tensor at q6_K, as asked
    assert facts["planned_bytes"] == round(planned)
    assert facts["planned_bits_per_weight"] == round(planned * 8 / params, 3)
    assert facts["fallbacks"] == [{"tensor": "blk.0.ffn_down.weight", "wanted": "q6_K", "got": "q8_0"}]
    assert facts["fallback_count"] == 1
    assert facts["size"] / planned - 1 > 0.01
    assert len(seen) == 1 and "1 tensor(s) fell back to larger types (blk.0.ffn_down.weight q6_K->q8_0" in seen[0]
    assert "larger than planned" in seen[0]


def test_no_warning_within_one_percent() -> None:
    types = {"token_embd.weight": "q8_0", "blk.0.ffn_down.weight": "q5_0", "blk.0.ffn_up.weight": "q8_0"}
    facts, seen = _audit([Fallback("blk.0.ffn_down.weight", "q4_K", "q5_0")], types)
    assert 0 < facts["size"] / facts["planned_bytes"] - 1 < 0.01 and seen == []
    facts, seen = _audit([], types)
    assert facts["planned_bytes"] == facts["size"] and facts["fallbacks"] == [] and seen == []


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fallbacks_are_reported(convert_python: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    from test_recipe import ffn320_model

    out = tmp_path / "out"
    proc = run_qwrap("run", str(ffn320_model(convert_python)), "-o", str(out), "-q", "Q4_K_M", "-q", "Q3_K_S",
                     "--no-eval", "--no-imatrix", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {a["quant"] for a in json.loads(proc.stdout)["artifacts"]} == {"Q4_K_M", "Q3_K_S"}
    wanted = {"Q4_K_M": [("blk.0.ffn_down.weight", "q4_K", "q5_0"), ("blk.1.ffn_down.weight", "q6_K", "q8_0")],
              "Q3_K_S": [("blk.0.ffn_down.weight", "q3_K", "q4_0"), ("blk.1.ffn_down.weight", "q3_K", "q4_0")]}
    for quant, expected in wanted.items():
        facts = next(r["info"] for r in Journal(out).records()
                     if r.get("step") == f"gguf.quantize:{quant}" and r.get("state") == "done")
        assert [(f["tensor"], f["wanted"], f["got"]) for f in facts["fallbacks"]] == expected
        assert facts["fallback_count"] == 2 and facts["recipe"] is None
        assert facts["planned_bits_per_weight"] < facts["bits_per_weight"]
        info = read_info(out / f"ffn320-{quant}.gguf")
        types = {t.name: BY_ID[t.ggml_type].name for t in info.tensors}
        assert all(types[t] == got for t, _, got in expected)  # the file holds what the tool said it fell back to
        # the warning: more than 1% larger than planned on this tiny model
        assert f"{quant}: 2 tensor(s) fell back to larger types" in " ".join(proc.stderr.split())
