"""The GGUF type table: every type llama-quantize makes, its file type, its bits per weight and
whether it needs an importance matrix; the aliases and the imatrix rules by type."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype, as written to general.file_type
    bpw: float  # bits per weight of the main tensors (the file is a little larger)
    needs_imatrix: bool
    note: str


def _q(name: str, ftype: int, bpw: float, note: str, needs: bool = False) -> QuantType:
    return QuantType(name, ftype, bpw, needs, note)


QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        _q("F32", 0, 32.0, "no quantization, 32-bit float"),
        _q("F16", 1, 16.0, "no quantization, 16-bit float"),
        _q("BF16", 32, 16.0, "no quantization, bfloat16"),
        _q("Q8_0", 7, 8.5, "near-lossless, large"),
        _q("Q6_K", 18, 6.56, "very low loss"),
        _q("Q5_K_M", 17, 5.69, "low loss, recommended for quality"),
        _q("Q5_K_S", 16, 5.54, "low loss"),
        _q("Q5_1", 9, 6.0, "legacy 5-bit"),
        _q("Q5_0", 8, 5.5, "legacy 5-bit"),
        _q("Q4_K_M", 15, 4.89, "balanced size/quality, the usual default"),
        _q("Q4_K_S", 14, 4.58, "smaller 4-bit"),
        _q("Q4_1", 3, 5.0, "legacy 4-bit"),
        _q("Q4_0", 2, 4.5, "legacy 4-bit"),
        _q("Q3_K_L", 13, 4.27, "3-bit, larger mix"),
        _q("Q3_K_M", 12, 3.91, "3-bit"),
        _q("Q3_K_S", 11, 3.5, "3-bit, smallest mix"),
        _q("Q2_K", 10, 3.0, "2-bit, high loss"),
        _q("Q2_K_S", 21, 2.75, "2-bit, high loss", True),
        _q("IQ4_NL", 25, 4.5, "non-linear 4-bit"),
        _q("IQ4_XS", 30, 4.25, "non-linear 4-bit, small"),
        _q("IQ3_M", 27, 3.66, "3-bit i-quant mix"),
        _q("IQ3_S", 26, 3.44, "3-bit i-quant"),
        _q("IQ3_XS", 22, 3.3, "3-bit i-quant"),
        _q("IQ3_XXS", 23, 3.06, "3-bit i-quant", True),
        _q("IQ2_M", 29, 2.7, "2-bit i-quant mix", True),
        _q("IQ2_S", 28, 2.5, "2-bit i-quant", True),
        _q("IQ2_XS", 20, 2.31, "2-bit i-quant", True),
        _q("IQ2_XXS", 19, 2.06, "2-bit i-quant", True),
        _q("IQ1_M", 31, 1.75, "1-bit i-quant, very high loss", True),
        _q("IQ1_S", 24, 1.56, "1-bit i-quant, very high loss", True),
    )
}

ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}
# Types llama-quantize quantizes without importance weights: an imatrix changes nothing.
IMATRIX_IGNORED = {"F32", "F16", "BF16", "Q8_0"}
# Types of 4 bits and less, where an importance matrix measurably lowers the error: computed for
# them by default whenever calibration text is available (--no-imatrix opts out).
IMATRIX_BY_DEFAULT = ("Q4_K", "Q3_K", "Q2_K", "IQ")
# The 16-bit intermediate's type, by --outtype.
OUTTYPE_NAMES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


def normalize_quant(name: str) -> str:
    key = name.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise UsageError(
            f"unknown GGUF quant type {name!r}",
            hint="Valid types (case-insensitive): " + ", ".join(QUANT_TYPES) + ". See `qwrap formats`.",
        )
    return key
