"""Fuzzed readers of bytes qwrap did not write itself (or may find corrupted): the GGUF header
reader, the safetensors header reader, config.json / the index / tokenizer_config.json, the
journal, the worker event protocol and the progress parsers. No input may raise anything but
the reader's own documented error (which the CLI turns into a sentence and an exit code).

Bounded: 200 examples each, no example database, well under a minute in all.
Inputs are random bytes and mutations (flipped, cut, spliced bytes) of valid files."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_qwrap
from qwrap.errors import JournalError, UsageError
from qwrap.formats.hfquant import Events
from qwrap.ggufinfo import GGUFFormatError, read_info
from qwrap.journal import Journal
from qwrap.modelfiles import BadFile, check_header, custom_code, parse_config, parse_header, read_index
from qwrap.pipeline import request_from_journal
from qwrap.progress import ChunkProgress, ConvertProgress, QuantizeProgress
from qwrap.workers import protocol as p

pytestmark = pytest.mark.heavy  # 200 examples a property: make test runs them, test-fast does not

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _valid_gguf() -> bytes:
    """A small but complete GGUF header: scalars, a string, arrays of strings and of ints, two tensors."""
    kv = [
        _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama"),
        _gguf_string("general.file_type") + struct.pack("<II", 4, 7),
        _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _gguf_string("a") + _gguf_string("b"),
        _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0.0, 1.0),
        _gguf_string("nested") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 3),
    ]
    tensors = [_gguf_string("w") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 0, 0),
               _gguf_string("b") + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 64)]
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv + tensors) + b"\0" * 96


def _valid_safetensors() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(22)


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with some bytes replaced, inserted or cut, or random bytes."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "insert", "cut", "truncate", "int"]))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 32))]
        elif op == "truncate":
            del data[at:]
        elif op == "int":  # a length or count field made huge, zero or negative-looking
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
            data[at:at + 8] = struct.pack("<Q", value)
    return bytes(data)


def _write(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qwrap-fuzz-"))
    path = folder / name
    path.write_bytes(data)
    return path


def test_the_seeds_are_valid() -> None:
    """The mutations start from files the readers accept (else the fuzzing proves little)."""
    info = read_info(_write(_valid_gguf(), "x.gguf"))
    assert info.architecture == "llama" and [t.name for t in info.tensors] == ["w", "b"]
    raw = _valid_safetensors()
    header = parse_header(raw)
    check_header(header, len(raw))
    assert sorted(header.tensors) == ["a", "b"]


@FUZZ
@given(mutated(_valid_gguf()), st.booleans())
def test_gguf_header_reader(data: bytes, keep_arrays: bool) -> None:
    path = _write(data, "x.gguf")
    try:
        info = read_info(path, keep_arrays=keep_arrays)
    except GGUFFormatError:
        return
    assert info.data_offset >= 0 and isinstance(info.metadata, dict)
    info.parameter_count  # noqa: B018 - must not raise either


def test_deeply_nested_gguf_arrays_are_a_format_error() -> None:
    nested = struct.pack("<IQ", 9, 1) * 100_000  # array of array of ... (each 12 bytes)
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string("k") + struct.pack("<I", 9) + nested
    with pytest.raises(GGUFFormatError):
        read_info(_write(data, "x.gguf"), keep_arrays=True)
    with pytest.raises(GGUFFormatError):
        read_info(_write(data, "x.gguf"))


@FUZZ
@given(mutated(_valid_safetensors()))
def test_safetensors_header_reader(data: bytes) -> None:
    try:
        check_header(parse_header(data), len(data))
    except BadFile:
        pass


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
CONFIG_KEYS = st.sampled_from(["architectures", "auto_map", "weight_map", "vocab_size", "model_type"])
JSON_DOCS = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(CONFIG_KEYS, JSON, max_size=4).map(lambda v: json.dumps(v).encode()),
    mutated(b'{"architectures": ["LlamaForCausalLM"], "auto_map": {"AutoModel": "m.M"}, '
            b'"weight_map": {"a": "model-00001.safetensors"}}'),
    st.just(b"[" * 100_000),
)


@FUZZ
@given(JSON_DOCS)
def test_config_index_and_tokenizer_config_readers(text: bytes) -> None:
    try:
        config = parse_config(text)
    except BadFile:
        config = {}
    folder = _write(text, "model.safetensors.index.json").parent
    (folder / "tokenizer_config.json").write_bytes(text)
    try:
        read_index(folder / "model.safetensors.index.json")
    except BadFile:
        pass
    found = custom_code(folder, config)
    assert all(isinstance(line, str) for line in found)


def _journal_lines() -> st.SearchStrategy[bytes]:
    good = [b'{"v": 1, "kind": "run", "request": {"model": "m", "output": "o", "formats": ["gguf"], '
            b'"format_options": {"gguf": {"quants": ["Q8_0"]}}}}',
            b'{"v": 1, "step": "gguf.convert", "state": "done", "fingerprint": "f", "outputs": '
            b'[{"path": "m.gguf", "bytes": 1, "sha256": "00"}]}',
            b'{"v": 1, "kind": "child", "step_ref": "gguf.convert", "pid": 1, "create_time": 1.0}']
    line = st.one_of(st.sampled_from(good), *(mutated(g) for g in good),
                     JSON.map(lambda v: json.dumps(v).encode()),
                     st.dictionaries(st.sampled_from(["v", "step", "state", "kind", "pid", "step_ref", "create_time",
                                                      "outputs", "info", "request", "fingerprint"]), JSON,
                                     max_size=6).map(lambda v: json.dumps(v).encode()))
    return st.lists(line, min_size=1, max_size=5).map(lambda lines: b"\n".join(lines) + b"\n")


@FUZZ
@given(_journal_lines())
def test_journal_reader(raw: bytes) -> None:
    out = Path(tempfile.mkdtemp(prefix="qwrap-fuzz-"))
    (out / ".checkpoint").mkdir()
    (out / ".checkpoint" / "journal.jsonl").write_bytes(raw)
    journal = Journal(out)
    for read in (journal.records, journal.states, journal.children, journal.run_header):
        try:
            read()
        except JournalError:
            pass
    try:
        request_from_journal(out)
    except (JournalError, UsageError):
        pass


def test_a_corrupt_journal_line_exits_15_with_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / ".checkpoint").mkdir(parents=True)
    (out / ".checkpoint" / "journal.jsonl").write_text('{"v": 1, "kind": "run"}\n{"v": 1, "step": \x00 nope\n'
                                                        '{"v": 1, "kind": "run"}\n')
    for argv in (("resume", str(out)), ("status", str(out))):
        proc = run_qwrap(*argv)
        assert proc.returncode == JournalError.exit_code, proc.stderr
        text = " ".join(proc.stderr.split())
        assert "journal.jsonl line 2 is not valid journal JSON" in text and "aside" in text, text
        assert "Traceback" not in proc.stderr


EVENT_NAMES = st.sampled_from([*p.EVENT_TYPES, "nope"])
EVENTS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    st.fixed_dictionaries({"v": st.sampled_from([p.PROTOCOL_VERSION, 0, "1"]), "event": EVENT_NAMES | JSON},
                          optional={k: JSON for k in ("index", "total", "done", "unit", "stage", "message", "kind",
                                                      "seconds", "peak_rss_bytes", "files", "metadata",
                                                      "output_dir", "task", "backend", "pid", "device")})
    .map(json.dumps),
    mutated(p.encode_event(p.LayerDone(index=0, total=2, seconds=1.0, peak_rss_bytes=5))),
)


@FUZZ
@given(EVENTS)
def test_worker_event_protocol(line: str | bytes) -> None:
    try:
        p.parse_event(line)
    except p.ProtocolError:
        return
    # what parse_event accepts, the parent's consumer uses without an exception
    events = Events(_Context())  # type: ignore[arg-type]
    events(line if isinstance(line, str) else line.decode("utf-8", "replace"))


class _Context:
    """What hfquant.Events calls on a step's context: progress and warnings, recorded."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def progress(self, done: float, total: float | None, unit: str) -> None:
        self.seen.append((done + 0, None if total is None else total + 0, unit + ""))

    def warning(self, message: str) -> None:
        self.seen.append(message + "")


@FUZZ
@given(st.text(max_size=300) | mutated(b'{"type": "log", "msg": "[1]5.1234,[2]6.5,"}').map(
    lambda b: b.decode("utf-8", "replace")))
def test_progress_parsers(line: str) -> None:
    for parser in (ConvertProgress(3), ConvertProgress(), QuantizeProgress(), ChunkProgress()):
        parser.feed(line)
        parser.feed(line)


@FUZZ
@given(st.sampled_from(["[  3/ 20]", "computing over 12 chunks", "[7]1.5,", "Writing: 100%|█| 1.2G/3.4G",
                        "INFO:hf-to-gguf:blk.0.attn_q.weight, torch.bfloat16 --> F16, shape = {256, 256}"]),
       st.text(max_size=30), st.text(max_size=30))
def test_progress_parsers_on_real_lines_among_noise(core: str, before: str, after: str) -> None:
    for parser in (ConvertProgress(3), QuantizeProgress(), ChunkProgress()):
        parser.feed(before + core + after)
