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
# The same line's parts, for what a dry run plans: the tensor and its stored type, then
# "size = 2.00 MiB -> 0.82 MiB (q6_K)" (a tensor it changes) or "size = 0.001 MiB" (one it keeps).
_QUANTIZE_NAMED = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[\d,\s]*\],\s+type\s*=\s*(\w+),")
_QUANTIZE_SIZE = re.compile(r"size\s*=\s*[\d.]+\s+MiB(?:\s*->\s*[\d.]+\s+MiB(?:\s+\((\w+)\))?)?")
# tensor_type_fallback in src/llama-quant.cpp, written in two or three parts:
# "warning: blk.0.ffn_down.weight - ncols 320 not divisible by 256 (required for type q4_K) "
# ["(WARNING: must use F16 due to unusual shape) "] "-> falling back to q5_0"
_FALLBACK_START = re.compile(r"warning:\s+(\S+)\s+-\s+ncols\s+\d+\s+not divisible by\s+\d+\s+"
                             r"\(required for type\s+(\w+)\)")
_FALLBACK_END = re.compile(r"->\s*falling back to\s+(\w+)")
_FALLBACK_SUMMARY = re.compile(r"WARNING:\s+(\d+) of (\d+) tensor\(s\) required fallback quantization")
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


@dataclass(frozen=True)
class Fallback:
    """A tensor llama-quantize gave another type than planned: its rows do not take the planned
    type's blocks (``tensor_type_fallback``)."""

    tensor: str
    wanted: str  # ggml type names, as the tool prints them (q4_K)
    got: str

    def to_json(self) -> dict[str, str]:
        return {"tensor": self.tensor, "wanted": self.wanted, "got": self.got}


class QuantizeProgress:
    """llama-quantize: ``[ i/ n]`` per tensor on stderr, possibly split across fragments
    with other messages in between: search anywhere in the line, keep the maximum.

    It also keeps what the audit needs: each fallback (its start and its end may arrive in
    different fragments, with other text between them), the tool's count of them, and in a
    ``--dry-run`` each tensor's stored type and the type it becomes (``planned``: only the
    tensors it changes)."""

    MAX_PENDING = 64  # unfinished fallback lines kept (garbage never grows it without bound)

    def __init__(self) -> None:
        self.done = 0
        self.fallbacks: list[Fallback] = []
        self.fallback_count: int | None = None  # the tool's own summary ("N of M tensor(s)")
        self.stored: dict[str, str] = {}  # every tensor listed -> its type in the input file
        self.planned: dict[str, str] = {}  # dry run: the tensors it changes -> their new type
        self._pending: list[tuple[str, str]] = []  # fallback starts waiting for their "-> falling back to"
        self._tensor: str | None = None  # the tensor whose line is being written

    def feed(self, line: str) -> Progress | None:
        self._collect(line)
        found = _QUANTIZE_TENSOR.findall(line)
        if not found:
            return None
        i, n = (int(x) for x in found[-1])
        self.done = max(self.done, i)
        return Progress(self.done, n, "tensors", "quantizing")

    def _collect(self, line: str) -> None:
        if "MiB" not in line and "fall" not in line and "type" not in line:
            return  # most lines (the loader's metadata dump) hold none of it
        tokens = sorted(
            [(m.start(), "start", m) for m in _FALLBACK_START.finditer(line)]
            + [(m.start(), "end", m) for m in _FALLBACK_END.finditer(line)]
            + [(m.start(), "tensor", m) for m in _QUANTIZE_NAMED.finditer(line)]
            + [(m.start(), "size", m) for m in _QUANTIZE_SIZE.finditer(line)],
            key=lambda t: t[0])
        for _, kind, m in tokens:
            if kind == "start":
                self._pending = [*self._pending[-self.MAX_PENDING + 1:], (m[1], m[2])]
            elif kind == "end" and self._pending:
                tensor, wanted = self._pending.pop(0)
                self.fallbacks.append(Fallback(tensor, wanted, m[1]))
            elif kind == "tensor":
                self._tensor = m[1]
                self.stored[m[1]] = m[2]
            elif kind == "size" and self._tensor is not None:
                if m[1]:
                    self.planned[self._tensor] = m[1]
                self._tensor = None
        summary = _FALLBACK_SUMMARY.search(line)
        if summary:
            self.fallback_count = int(summary[1])


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
