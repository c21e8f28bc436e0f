"""Pure line parsers: a child's own output -> progress events.

Each parser is a small stateful object with ``feed(line) -> Progress | None``; it never
touches a terminal and never raises on unexpected text (tools print plenty of other
lines). Tested on recorded real output in tests/data/.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    done: float
    total: float | None
    unit: str  # "tensors", "bytes", "chunks", "layers"
    phase: str = ""


_SIZE_UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
# convert_hf_to_gguf.py: "INFO:hf-to-gguf:blk.0.attn_q.weight,  torch.float16 --> F16, shape = {256, 256}"
_CONVERT_TENSOR = re.compile(r"^INFO:hf-to-gguf:(\S+),\s+torch\.\w+ --> \w+, shape = ")
# tqdm: "Writing:  45%|####      | 12.3M/27.0M [00:01<00:01, 10.2Mbyte/s]"
_CONVERT_WRITING = re.compile(r"Writing:\s+\d+%\|.*?\|\s*([\d.]+)([kKMGT]?)/([\d.]+)([kKMGT]?)")
# llama-quantize: "[  12/  39]   blk.0.attn_k.weight - [256, 256, 1, 1], type = f16, ..."
_QUANTIZE_TENSOR = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+\S+\s+-\s+\[")
_CHUNKS_TOTAL = re.compile(r"(?:computing|calculating \w+) over (\d+) chunks")
_CHUNK_DONE = re.compile(r"\[(\d+)\](?:-?[\d.]+|nan|inf),")


def _size(number: str, suffix: str) -> float:
    return float(number) * _SIZE_UNITS[suffix]


class ConvertProgress:
    """convert_hf_to_gguf.py: one line per tensor as it is prepared, then a Writing bar."""

    def __init__(self, total_tensors: int | None = None):
        self.total_tensors = total_tensors
        self.tensors = 0

    def feed(self, line: str) -> Progress | None:
        m = _CONVERT_WRITING.search(line)
        if m:
            return Progress(_size(m[1], m[2]), _size(m[3], m[4]), "bytes", "writing")
        if _CONVERT_TENSOR.search(line):
            self.tensors += 1
            return Progress(self.tensors, self.total_tensors, "tensors", "reading")
        return None


class QuantizeProgress:
    """llama-quantize: ``[ i/ n]`` per tensor on stderr, possibly split across fragments
    with other messages in between: search anywhere in the line, keep the maximum."""

    def __init__(self) -> None:
        self.done = 0

    def feed(self, line: str) -> Progress | None:
        found = _QUANTIZE_TENSOR.findall(line)
        if not found:
            return None
        i, n = (int(x) for x in found[-1])
        self.done = max(self.done, i)
        return Progress(self.done, n, "tensors", "quantizing")


class ChunkProgress:
    """llama-imatrix / llama-perplexity with ``--log-jsonl``: log messages arrive as
    ``{"type": "log", "msg": ...}``; chunk results as ``[k]value,`` messages."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0

    @staticmethod
    def message(line: str) -> str:
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                return line
            if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
                return obj["msg"]
        return line

    def feed(self, line: str) -> Progress | None:
        msg = self.message(line)
        m = _CHUNKS_TOTAL.search(msg)
        if m:
            self.total = int(m[1])
            return Progress(0, self.total, "chunks")
        done = [int(k) for k in _CHUNK_DONE.findall(msg)]
        if not done:
            return None
        self.done = max(self.done, *done)
        return Progress(self.done, self.total, "chunks")


# ninja (cmake --build): "[12/345] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o"
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] ")


class NinjaProgress:
    """cmake --build with ninja: one ``[done/total]`` line per finished edge."""

    def feed(self, line: str) -> Progress | None:
        m = _NINJA_STEP.match(line)
        return Progress(int(m[1]), int(m[2]), "objects", "building") if m else None
