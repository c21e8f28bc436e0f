"""The tensor types of the pinned ggml (what a recipe rule or ``--tensor-type`` names): each
type's id in a GGUF header, its block of weights and the bytes one block takes, so a tensor's
quantized size and whether its rows can take a type are computed exactly, without a tool.

Values from the pinned ``ggml/include/ggml.h`` (ids) and ``ggml/src/ggml-common.h`` (block
layouts); tests compare them with sizes the pinned ``llama-quantize`` writes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ...errors import UsageError


@dataclass(frozen=True)
class GGMLType:
    name: str  # as ggml spells it (q4_K, iq4_xs, f16); llama-quantize matches it case-insensitively
    id: int  # ggml_type, as written in a GGUF tensor info
    block: int  # weights per block: a row's length must be a multiple of it
    block_bytes: int
    quantized: bool = True

    @property
    def bpw(self) -> float:
        return self.block_bytes * 8 / self.block

    def tensor_bytes(self, shape: Sequence[int]) -> int:
        n = 1
        for d in shape:
            n *= d
        return n // self.block * self.block_bytes

    def exact_bytes(self, shape: Sequence[int]) -> float:
        """Its bits per weight over every weight, also where a row is not a whole number of
        blocks (what a type asked for would have cost, before a fallback)."""
        n = 1
        for d in shape:
            n *= d
        return n * self.block_bytes / self.block

    def fits(self, shape: Sequence[int]) -> bool:
        """llama-quantize falls back to another type when a row is not a whole number of blocks."""
        return bool(shape) and shape[0] % self.block == 0


QK_K = 256
GGML_TYPES: dict[str, GGMLType] = {
    t.name.lower(): t
    for t in (
        GGMLType("f32", 0, 1, 4, False),
        GGMLType("f16", 1, 1, 2, False),
        GGMLType("bf16", 30, 1, 2, False),
        GGMLType("q4_0", 2, 32, 18),
        GGMLType("q4_1", 3, 32, 20),
        GGMLType("q5_0", 6, 32, 22),
        GGMLType("q5_1", 7, 32, 24),
        GGMLType("q8_0", 8, 32, 34),
        GGMLType("q2_K", 10, QK_K, 84),
        GGMLType("q3_K", 11, QK_K, 110),
        GGMLType("q4_K", 12, QK_K, 144),
        GGMLType("q5_K", 13, QK_K, 176),
        GGMLType("q6_K", 14, QK_K, 210),
        GGMLType("iq2_xxs", 16, QK_K, 66),
        GGMLType("iq2_xs", 17, QK_K, 74),
        GGMLType("iq3_xxs", 18, QK_K, 98),
        GGMLType("iq1_s", 19, QK_K, 50),
        GGMLType("iq4_nl", 20, 32, 18),
        GGMLType("iq3_s", 21, QK_K, 110),
        GGMLType("iq2_s", 22, QK_K, 82),
        GGMLType("iq4_xs", 23, QK_K, 136),
        GGMLType("iq1_m", 29, QK_K, 56),
        GGMLType("tq1_0", 34, QK_K, 54),
        GGMLType("tq2_0", 35, QK_K, 66),
        GGMLType("mxfp4", 39, 32, 17),
    )
}
BY_ID = {t.id: t for t in GGML_TYPES.values()}
ALIGNMENT = 32  # GGUF tensor data alignment (general.alignment's default)
# Types whose quantization without an importance matrix llama-quantize refuses or ruins.
NEEDS_IMATRIX = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "iq3_xxs"})
# Not made by llama-quantize for weights (ternary and MXFP4 types need models trained for them).
NOT_FOR_RECIPES = frozenset({"tq1_0", "tq2_0", "mxfp4"})


def parse_type(text: str, where: str = "") -> GGMLType:
    """A tensor type as llama-quantize reads it (case-insensitive ggml type name)."""
    t = GGML_TYPES.get(text.strip().lower())
    if t is None or t.name.lower() in NOT_FOR_RECIPES:
        usable = ", ".join(n.name for n in GGML_TYPES.values() if n.name.lower() not in NOT_FOR_RECIPES)
        raise UsageError(f"{where}unknown tensor type {text!r}",
                         hint=f"Tensor types (case-insensitive, as ggml names them): {usable}.")
    return t


def aligned(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def file_bytes(data_offset: int, tensors: Iterable[tuple[GGMLType, Sequence[int]]], alignment: int = ALIGNMENT) -> int:
    """A GGUF file's exact size: its header (``data_offset``), then each tensor's data padded
    to the alignment, as llama-quantize writes it."""
    return data_offset + sum(aligned(t.tensor_bytes(shape), alignment) for t, shape in tensors)

