"""The model folder's files checked before any heavy work, from their first bytes only.

Every safetensors file's header parses, its tensors lie inside the file, their byte lengths
match dtype x shape and the file is exactly as long as the header says; every shard an index
names exists; every dtype is one the pinned converter reads; config.json parses and names an
architecture. A truncated download fails here, naming the file and the command that fetches it
again, instead of minutes into a conversion with a numpy traceback.

Plain ``struct`` + ``json`` on the header (a few kB); no weights read, nothing imported that
loads tensors, never pickle.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFilesError

# Bytes per element of each dtype the pinned converter maps to torch (conversion/base.py
# `_dtype_str_map`); the backends' safetensors/torch read all of them too.
READABLE_DTYPES: Mapping[str, int] = {
    "F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2,
    "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelSource:
    """A model as a local folder: a local model as given, or a Hub model's snapshot (hub.py)."""

    path: Path  # local folder holding config.json (+ tokenizer, weights)
    name: str  # for artifact names: last path component / repo name
    repo_id: str | None  # None for local folders
    revision: str | None  # resolved commit sha for Hub models


class BadFile(ValueError):
    """What is wrong with one file, in words (the caller adds the file and the fix)."""


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: its tensors and how long the file must be."""

    tensors: Mapping[str, Tensor]
    header_bytes: int  # the JSON text's length (the 8-byte length prefix not included)

    @property
    def file_bytes(self) -> int:
        return 8 + self.header_bytes + max((t.end for t in self.tensors.values()), default=0)


def _tensor(name: str, info: Any) -> Tensor:
    if not isinstance(info, dict):
        raise BadFile(f"tensor {name!r} has no dtype/shape/offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise BadFile(f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadFile(f"tensor {name!r} has a malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise BadFile(f"tensor {name!r} has malformed data offsets {offsets!r}")
    return Tensor(dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(head: bytes) -> Header:
    """The header from a file's first bytes (at least ``8 + its length``); BadFile otherwise."""
    if len(head) < 8:
        raise BadFile(f"it is only {len(head)} bytes long, too short for a safetensors header")
    (size,) = struct.unpack("<Q", head[:8])
    if size > MAX_HEADER_BYTES:
        raise BadFile(f"its header claims {size} bytes, more than safetensors allows: not a safetensors file")
    text = head[8:8 + size]
    if len(text) < size:
        raise BadFile(f"it ends inside its header ({len(text)} of {size} header bytes)")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadFile(f"its header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise BadFile("its header is not a JSON object")
    tensors = {str(k): _tensor(str(k), v) for k, v in data.items() if k != "__metadata__"}
    return Header(tensors, size)


def read_header(path: Path) -> Header:
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return parse_header(prefix)
        (size,) = struct.unpack("<Q", prefix)
        return parse_header(prefix + f.read(min(size, MAX_HEADER_BYTES)))


def check_header(header: Header, file_bytes: int) -> None:
    """Every tensor inside the data, as long as dtype x shape, a dtype the tools read, and
    the file exactly as long as the header says."""
    data_bytes = file_bytes - 8 - header.header_bytes
    for name, t in header.tensors.items():
        if t.dtype not in READABLE_DTYPES:
            raise BadFile(f"tensor {name!r} has dtype {t.dtype}, which the pinned converter cannot read "
                          f"(it reads {', '.join(READABLE_DTYPES)})")
        if t.end - t.begin != t.elements * READABLE_DTYPES[t.dtype]:
            raise BadFile(f"tensor {name!r} ({t.dtype} {list(t.shape)}) needs {t.elements * READABLE_DTYPES[t.dtype]} "
                          f"bytes but its offsets span {t.end - t.begin}")
        if t.end > data_bytes:
            raise BadFile(f"tensor {name!r} ends at byte {8 + header.header_bytes + t.end} of a "
                          f"{file_bytes}-byte file: the file is truncated")
    if file_bytes != header.file_bytes:
        raise BadFile(f"it is {file_bytes} bytes long but its header says {header.file_bytes}"
                      + (": the file is truncated" if file_bytes < header.file_bytes else ""))


def check_safetensors(path: Path) -> Header:
    """The header of ``path`` after checking it against the file; BadFile with what is wrong."""
    header = read_header(path)
    check_header(header, path.stat().st_size)
    return header


def read_index(path: Path) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` maps its tensors to."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise BadFile(f"it is not valid JSON ({type(exc).__name__})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadFile("it has no \"weight_map\" object of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise BadFile(f"it names the shard {shard!r}, which is not a file name in the model folder")
    return shards


def parse_config(text: bytes) -> dict[str, Any]:
    """config.json as a dict that names an architecture; BadFile otherwise."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadFile(f"it is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise BadFile("it is not a JSON object")
    arch = data.get("architectures")
    if not isinstance(arch, list) or not arch or not isinstance(arch[0], str) or not arch[0]:
        raise BadFile("it names no architecture (an \"architectures\" list such as [\"LlamaForCausalLM\"])")
    return data


# -- the folder --------------------------------------------------------------------------


def _fix(source: ModelSource, name: str) -> str:
    """How to get a good copy of ``name`` again: for a Hub model the exact command."""
    if source.repo_id is None:
        return (f"Copy or download {name} into {source.path} again (it is damaged or incomplete), "
                "then run the same command.")
    cached = (source.path / name).resolve()
    rev = f" --revision {source.revision}" if source.revision else ""
    return (f"The cached download is damaged: remove {cached} and fetch it again with "
            f"`hf download {source.repo_id} {name}{rev} --force-download`, then run the same command.")


def _error(source: ModelSource, name: str, what: str) -> ModelFilesError:
    return ModelFilesError(f"{source.path / name}: {what}", hint=_fix(source, name))


def shards(source: ModelSource) -> list[str]:
    """The safetensors files the tools will read: the index's shards, else the root's files
    (``model.safetensors`` alone when present, as hub._weight_files chooses)."""
    folder = source.path
    if (folder / INDEX).is_file():
        try:
            return read_index(folder / INDEX)
        except (BadFile, OSError) as exc:
            raise _error(source, INDEX, str(exc)) from None
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    return ["model.safetensors"] if "model.safetensors" in names else names


def verify(source: ModelSource, *, weights: bool = True) -> dict[str, Any]:
    """config.json (returned) and every safetensors shard checked; ModelFilesError naming the
    file otherwise. ``weights=False`` (a Hub model planned without its weights): shards that
    are not downloaded yet are not required."""
    try:
        config = parse_config((source.path / "config.json").read_bytes())
    except (BadFile, OSError) as exc:
        raise _error(source, "config.json", str(exc)) from None
    for name in shards(source):
        path = source.path / name
        if not path.is_file():
            if not weights and source.repo_id is not None:
                continue
            raise _error(source, name, f"the file is missing (named in {INDEX})")
        try:
            header = check_safetensors(path)
        except BadFile as exc:
            raise _error(source, name, str(exc)) from None
        except OSError as exc:
            raise _error(source, name, f"cannot be read ({exc.strerror or exc})") from None
        _check_vocab(source, config, name, header)
    return config


EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def _check_vocab(source: ModelSource, config: Mapping[str, Any], name: str, header: Header) -> None:
    """config.json's vocab_size is the token embedding's row count (llama.cpp and transformers
    both refuse the model otherwise, after the conversion)."""
    text = config.get("text_config", config)
    vocab = text.get("vocab_size") if isinstance(text, Mapping) else None
    if type(vocab) is not int:
        return
    for tensor, t in header.tensors.items():
        if tensor.endswith(EMBEDDINGS) and "vision" not in tensor and len(t.shape) == 2 and t.shape[0] != vocab:
            raise ModelFilesError(
                f"{source.path / 'config.json'} says vocab_size {vocab} but {name}'s {tensor} has {t.shape[0]} rows",
                hint=f"Set \"vocab_size\": {t.shape[0]} in config.json if the weights are right; otherwise "
                + _fix(source, "config.json")[0].lower() + _fix(source, "config.json")[1:])


def check_dtypes(source: ModelSource, counts: Mapping[str, int]) -> None:
    """Dtypes known from remote headers (a Hub model planned without its weights)."""
    bad = sorted(d for d in counts if d not in READABLE_DTYPES)
    if bad:
        raise ModelFilesError(f"{source.repo_id or source.path} has weights of dtype {', '.join(bad)}, which the "
                              "pinned converter cannot read",
                              hint=f"Use a checkpoint in one of {', '.join(READABLE_DTYPES)} (bf16/f16 are usual).")


def custom_code(folder: Path, config: Mapping[str, Any]) -> list[str]:
    """What of the model is its own Python code: config.json's (and tokenizer_config.json's)
    ``auto_map`` entries and the ``*.py`` files at the folder's root; empty for a model that
    transformers' own classes load."""
    found: list[str] = []
    for name, data in (("config.json", config), ("tokenizer_config.json", _json_or_none(folder / "tokenizer_config.json"))):
        auto_map = data.get("auto_map") if isinstance(data, Mapping) else None
        if isinstance(auto_map, Mapping) and auto_map:
            refs = ", ".join(f"{k} -> {_ref(v)}" for k, v in auto_map.items())
            found.append(f"{name} auto_map: {refs}")
    files = sorted(p.name for p in folder.glob("*.py"))
    if files:
        found.append("code files: " + ", ".join(files))
    return found


def _ref(value: Any) -> str:
    """An auto_map entry: "module.Class", or [slow, fast] for tokenizers (either may be null)."""
    if isinstance(value, list):
        return "/".join(str(v) for v in value)
    return str(value)


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
