"""Parsers on recorded real output (tests/data/recorded/, captured from the pinned tools)."""

from __future__ import annotations

import re
from pathlib import Path

from qwrap.progress import ChunkProgress, ConvertProgress, NinjaProgress, Progress, QuantizeProgress

RECORDED = Path(__file__).parent / "data" / "recorded"


def lines(name: str) -> list[str]:
    # As the supervisor delivers them: split on \r and \n.
    text = (RECORDED / name).read_text(errors="replace")
    return [part for part in re.split(r"\r\n|\r|\n", text) if part.strip()]


def test_convert_counts_tensors_then_bytes() -> None:
    parser = ConvertProgress(total_tensors=21)
    events = [e for e in map(parser.feed, lines("convert_hf_to_gguf.log")) if e]
    tensors = [e for e in events if e.unit == "tensors"]
    writing = [e for e in events if e.unit == "bytes"]
    assert len(tensors) == 21 and tensors[-1] == Progress(21, 21, "tensors", "reading")
    assert writing and writing[-1].done == writing[-1].total == 6.56e6
    assert writing[0].done == 0


def test_quantize_reaches_total() -> None:
    parser = QuantizeProgress()
    events = [e for e in map(parser.feed, lines("llama-quantize-Q4_K_M.log")) if e]
    assert [e.done for e in events] == list(range(1, 22))
    assert events[-1].total == 21


def test_quantize_survives_fragments_and_interleaving() -> None:
    """Each tensor line can arrive in fragments with other messages in between."""
    parser = QuantizeProgress()
    stream = [
        "[  12/  39]",
        "ggml_something: unrelated message",
        "[  12/  39] blk.0.attn_k.weight - [256, 256, 1, 1], type = f16, converting to q4_K .. ",
        "size = 0.12 MiB -> 0.03 MiB",
        "load_imatrix: noise [  13/  39]   blk.0.attn_q.weight - [256, 256, 1, 1], type = f16,",
        "[  11/  39] blk.0.ffn_up.weight - [",  # out-of-order repeat never moves backwards
    ]
    events = [e for e in map(parser.feed, stream) if e]
    assert [e.done for e in events] == [12, 13, 13]


def test_chunk_progress_from_jsonl_and_plain() -> None:
    parser = ChunkProgress()
    stream = [
        '{"type": "log", "time": 1, "level": "INFO", "msg": "compute_imatrix: computing over 4 chunks, n_ctx=512, batch_size=512, n_seq=1\\n"}',
        '{"type": "log", "time": 2, "level": "INFO", "msg": "[1]12.3456,"}',
        "not json at all",
        '{"type": "log", "msg": "[2]11.0000,[3]10.5000,"}',
        "[4]nan,",
    ]
    events = [e for e in map(parser.feed, stream) if e]
    assert [(e.done, e.total) for e in events] == [(0, 4), (1, 4), (3, 4), (4, 4)]


def test_parsers_ignore_garbage() -> None:
    for parser in (ConvertProgress(), QuantizeProgress(), ChunkProgress()):
        assert parser.feed("") is None
        assert parser.feed("\x1b[31mcolored\x1b[0m {{{") is None


def test_ninja_counts_build_edges() -> None:
    """Recorded from `cmake --build` of a small CMake/Ninja project (what `qwrap setup` parses)."""
    parser = NinjaProgress()
    events = [e for e in map(parser.feed, [*lines("ninja-build.log"), "-- Configuring done", "ninja: no work to do."]) if e]
    assert [e.done for e in events] == [1, 2, 3, 4, 5] and events[-1] == Progress(5, 5, "objects", "building")
