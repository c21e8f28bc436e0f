"""Read a GGUF file's header: metadata and tensor infos, without loading tensor data.

Stdlib only, so the parent stays light and is not tied to a gguf-py release that may not
know the newest types. Tests compare it with the pinned tree's own gguf-py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int = 0  # where tensor data starts (tensor offsets are relative to it)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get("general.file_type")
        return value if isinstance(value, int) else None

    @property
    def parameter_count(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total


def _reader(f: BinaryIO) -> Callable[[str], Any]:
    def read(fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise GGUFFormatError("file ends inside the header (truncated?)")
        return struct.unpack("<" + fmt, data)[0]

    return read


def _string(f: BinaryIO, read: Callable[[str], Any]) -> str:
    length = read("Q")
    if length > 1 << 30:
        raise GGUFFormatError("implausible string length in header")
    data = f.read(length)
    if len(data) != length:
        raise GGUFFormatError("file ends inside the header (truncated?)")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, read: Callable[[str], Any], vtype: int, keep_arrays: bool) -> Any:
    if vtype in _SCALARS:
        return read(_SCALARS[vtype])
    if vtype == _STRING:
        return _string(f, read)
    if vtype == _ARRAY:
        item_type, count = read("I"), read("Q")
        items = [_value(f, read, item_type, keep_arrays) for _ in range(count)]
        return items if keep_arrays else len(items)
    raise GGUFFormatError(f"unknown metadata value type {vtype}")


def read_info(path: Path, *, keep_arrays: bool = False) -> GGUFInfo:
    """Parse the header. Arrays (the vocabulary...) are reduced to their length unless asked."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
        read = _reader(f)
        version = read("I")
        n_tensors, n_kv = read("Q"), read("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f, read)
            metadata[key] = _value(f, read, read("I"), keep_arrays)
        tensors = []
        for _ in range(n_tensors):
            name = _string(f, read)
            dims = tuple(read("Q") for _ in range(read("I")))
            tensors.append(TensorInfo(name, dims, read("I"), read("Q")))
        alignment = metadata.get("general.alignment", 32)
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
        data_offset = -(-f.tell() // alignment) * alignment
    return GGUFInfo(version, metadata, tuple(tensors), data_offset)


def tensor_data(path: Path, info: GGUFInfo) -> dict[str, bytes]:
    """Each tensor's raw bytes (for comparisons in tests and tools; reads the whole file)."""
    ordered = sorted(info.tensors, key=lambda t: t.offset)
    end = path.stat().st_size - info.data_offset
    out: dict[str, bytes] = {}
    with path.open("rb") as f:
        for i, t in enumerate(ordered):
            stop = ordered[i + 1].offset if i + 1 < len(ordered) else end
            f.seek(info.data_offset + t.offset)
            out[t.name] = f.read(stop - t.offset)
    return out
