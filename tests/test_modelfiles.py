"""Broken model folders are caught before any step runs: real tiny models broken on purpose
(truncated, bad headers, a missing shard, an unreadable dtype, a bad config.json), each giving
a sentence that names the file, the fix and exit 20 from `plan` and `run`."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import run_qwrap
from hubserver import HubServer
from qwrap.errors import ModelFilesError
from qwrap.modelfiles import BadFile, check_header, parse_header, read_header

EXIT = ModelFilesError.exit_code


def _rewrite_header(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    """Rewrite a safetensors file's JSON header, keeping its data bytes."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def _first_tensor(header: dict[str, object]) -> dict[str, object]:
    name = next(k for k in header if k != "__metadata__")
    entry = header[name]
    assert isinstance(entry, dict)
    return entry


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 4096)


def _garbage_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00" * 8 + b"PK\x03\x04 this is a zip file")


def _huge_header_length(folder: Path) -> None:
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def _offsets_past_end(folder: Path) -> None:
    _rewrite_header(folder / "model.safetensors",
                    lambda h: _first_tensor(h).update(data_offsets=[0, 2**40]))


def _unreadable_dtype(folder: Path) -> None:
    # U16 has BF16's width, so only the dtype is wrong: the converter has no torch type for it
    _rewrite_header(folder / "model.safetensors", lambda h: _first_tensor(h).update(dtype="U16"))


def _missing_shard(folder: Path) -> None:
    header = read_header(folder / "model.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in header.tensors}
    weight_map[next(iter(weight_map))] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 2')


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _config_without_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))


BROKEN = {
    "truncated": (_truncate, "model.safetensors", "truncated"),
    "garbage header": (_garbage_header, "model.safetensors", "too short|not valid JSON|ends inside"),
    "huge header length": (_huge_header_length, "model.safetensors", "not a safetensors file"),
    "offsets past the end": (_offsets_past_end, "model.safetensors", "offsets span"),
    "unreadable dtype": (_unreadable_dtype, "model.safetensors", "dtype U16"),
    "missing shard": (_missing_shard, "model-00002-of-00002.safetensors", "missing"),
    "vocab size mismatch": (lambda f: _edit_config(f, vocab_size=5000), "config.json",
                            "says vocab_size 5000 but model.safetensors's model.embed_tokens.weight has 4096 rows"),
    "config not json": (_config_not_json, "config.json", "not valid JSON"),
    "config without architecture": (_config_without_architecture, "config.json", "names no architecture"),
}


@pytest.fixture
def broken(request: pytest.FixtureRequest, tiny_model: Path, tmp_path: Path) -> tuple[Path, str, str]:
    change, name, why = BROKEN[request.param]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    change(folder)
    return folder, name, why


@pytest.mark.slow
@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_plan_names_the_broken_file(broken: tuple[Path, str, str], tmp_path: Path) -> None:
    folder, name, why = broken
    proc = run_qwrap("plan", str(folder), "-q", "Q8_0", "-o", str(tmp_path / "out"))
    assert proc.returncode == EXIT, proc.stderr
    assert str(folder / name) in proc.stderr
    assert re.search(why, " ".join(proc.stderr.split())), proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"download {name}" in proc.stderr  # the fix names the file to fetch again


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["truncated", "missing shard"], indirect=True)
@pytest.mark.parametrize("fmt", ["gguf", "awq"])
def test_run_stops_before_any_step(broken: tuple[Path, str, str], fmt: str, tmp_path: Path) -> None:
    folder, name, _ = broken
    out = tmp_path / "out"
    proc = run_qwrap("run", str(folder), "--format", fmt, "-q", "Q8_0", "-o", str(out), "--no-eval")
    assert proc.returncode == EXIT, proc.stderr
    assert str(folder / name) in proc.stderr
    assert not out.exists()  # nothing started: not even the journal


@pytest.mark.slow
def test_a_truncated_hub_download_names_the_cached_file_and_the_command(tiny_model: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model, repo)
    _truncate(repo)
    hf_home = tmp_path / "hf"
    with HubServer() as hub:
        hub.add_repo("acme/tiny-llama", repo)
        proc = run_qwrap("run", "acme/tiny-llama", "-q", "Q8_0", "-o", str(tmp_path / "out"), "--no-eval",
                         env={"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home)})
    assert proc.returncode == EXIT, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "truncated" in text
    assert "hf download acme/tiny-llama model.safetensors --revision " in text
    blob = next((hf_home / "hub").rglob("blobs/*"), None)
    assert blob is not None and f"remove {blob}" in text  # the cached copy to delete
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_good_model_passes(tiny_model: Path) -> None:
    header = read_header(tiny_model / "model.safetensors")
    check_header(header, (tiny_model / "model.safetensors").stat().st_size)
    assert header.file_bytes == (tiny_model / "model.safetensors").stat().st_size
    assert all(t.dtype == "BF16" for t in header.tensors.values() if len(t.shape) == 2)


@pytest.mark.parametrize("head", [b"", b"\x01", struct.pack("<Q", 4) + b"[1]x", struct.pack("<Q", 9) + b"{}"])
def test_short_or_odd_headers_are_bad_files(head: bytes) -> None:
    with pytest.raises(BadFile):
        parse_header(head)


@pytest.mark.slow
def test_a_broken_index_on_the_hub_is_named(tiny_model: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model, repo)
    (repo / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')
    with HubServer() as hub:
        hub.add_repo("acme/tiny-llama", repo)
        proc = run_qwrap("run", "acme/tiny-llama", "-q", "Q8_0", "-o", str(tmp_path / "out"), "--no-eval",
                         env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    text = " ".join(proc.stderr.split())
    assert proc.returncode == EXIT, proc.stderr
    assert "model.safetensors.index.json: it is not valid JSON" in text
    assert "hf download acme/tiny-llama model.safetensors.index.json --force-download" in text
