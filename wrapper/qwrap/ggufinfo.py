"""Read a GGUF file's header: metadata and tensor infos, without loading tensor data.

Stdlib only, so the parent stays light and is not tied to a gguf-py release that may not
know the newest types. Tests compare it with the pinned tree's own gguf-py.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_NESTING = 16


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
    header_bytes: int = 0  # the header's own bytes (metadata and tensor infos), before the alignment padding

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


class _Cursor:
    """Reads the header straight out of a memory map: no per-field file reads, and
    fixed-size arrays are skipped with one addition (vocabularies hold 100k+ entries)."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.pos = 0

    def read(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as exc:
            raise GGUFFormatError("file ends inside the header (truncated?)") from exc
        self.pos += struct.calcsize("<" + fmt)
        return value

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.buf):
            raise GGUFFormatError("file ends inside the header (truncated?)")

    def string(self) -> str:
        length = self.read("Q")
        if length > 1 << 30 or self.pos + length > len(self.buf):
            raise GGUFFormatError("file ends inside the header (truncated?)")
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        return bytes(data).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool, depth: int = 0) -> Any:
        if depth > MAX_NESTING:  # llama.cpp writes flat arrays; a corrupt file may nest them endlessly
            raise GGUFFormatError(f"metadata arrays nested deeper than {MAX_NESTING}: not a GGUF file qwrap can read")
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.read("I"), self.read("Q")
            if keep_arrays:
                return [self.value(item_type, keep_arrays, depth + 1) for _ in range(count)]
            if item_type in _SCALARS:
                self.skip(count * struct.calcsize("<" + _SCALARS[item_type]))
            elif item_type == _STRING:
                for _ in range(count):
                    self.skip(self.read("Q"))
            else:
                for _ in range(count):
                    self.value(item_type, keep_arrays, depth + 1)
            return count
        raise GGUFFormatError(f"unknown metadata value type {vtype}")


def read_info(path: Path, *, keep_arrays: bool = False) -> GGUFInfo:
    """Parse the header. Arrays (the vocabulary...) are reduced to their length unless asked."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf)
            cur.skip(4)
            version = cur.read("I")
            n_tensors, n_kv = cur.read("Q"), cur.read("Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.read("I"), keep_arrays)
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = tuple(cur.read("Q") for _ in range(cur.read("I")))
                tensors.append(TensorInfo(name, dims, cur.read("I"), cur.read("Q")))
            end = cur.pos
    alignment = metadata.get("general.alignment", 32)
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
    data_offset = -(-end // alignment) * alignment
    return GGUFInfo(version, metadata, tuple(tensors), data_offset, end)


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
