"""Budgets (``--target-size``, ``--target-bpw``, ``--target-kld``): what a searched recipe must
meet, as values with a stable key (the request's JSON, fingerprints) and a label (file and step
names)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ...errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
KINDS = ("size", "bpw", "kld")


@dataclass(frozen=True)
class Target:
    kind: str  # "size" (bytes), "bpw" (bits per weight of the file) or "kld" (mean KLD limit)
    value: float

    @property
    def key(self) -> str:
        return f"{self.kind}={self.value:g}" if self.kind != "size" else f"size={int(self.value)}"

    @property
    def label(self) -> str:
        """In file and step names: size-4.5G, bpw-4.8, kld-0.01."""
        if self.kind == "size":
            return f"size-{human_size(int(self.value))}"
        return f"{self.kind}-{self.value:g}"

    @property
    def shown(self) -> str:
        if self.kind == "size":
            return f"--target-size {human_size(int(self.value))}"
        return f"--target-{self.kind} {self.value:g}"

    def budget_bytes(self, parameters: int) -> int | None:
        """The file size the search must fit in (None for a KLD target)."""
        if self.kind == "size":
            return int(self.value)
        if self.kind == "bpw":
            return int(self.value * parameters / 8)
        return None

    @classmethod
    def from_key(cls, key: str) -> Target:
        kind, _, value = key.partition("=")
        if kind not in KINDS:
            raise ValueError(f"not a budget: {key!r}")
        return cls(kind, float(value))


def human_size(n: int) -> str:
    for unit, size in (("T", 1000**4), ("G", 1000**3), ("M", 1000**2), ("K", 1000)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    unit = m[2].upper() if m else ""
    if m is None or unit not in _UNITS:
        raise UsageError(f"--target-size {text!r} is not a size",
                         hint="Bytes, or a number with K, M, G or T (decimal) or KiB, MiB, GiB (binary): 4.5G, 800MiB.")
    size = int(float(m[1]) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"--target-size {text!r} must be more than 0 bytes")
    return size


def _number(flag: str, text: str, low: float, high: float, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not low < value < high:
        raise UsageError(f"{flag} {text!r} is not a number between {low:g} and {high:g}", hint=f"For example {flag} {example}.")
    return value


def parse_targets(sizes: Iterable[str], bpws: Iterable[str], klds: Iterable[str]) -> tuple[Target, ...]:
    found = [Target("size", parse_size(str(s))) for s in sizes]
    found += [Target("bpw", _number("--target-bpw", str(b), 1.5, 16.0, "4.8")) for b in bpws]
    found += [Target("kld", _number("--target-kld", str(k), 0.0, 10.0, "0.01")) for k in klds]
    return tuple(dict.fromkeys(found))


# The stock K mixes, smallest first: a searched file is written as the one nearest under its
# budget (its general.file_type; every quantized tensor's type comes from the recipe).
BASE_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def base_quant(target: Target, parameters: int) -> str:
    from .quants import QUANT_TYPES

    budget = target.budget_bytes(parameters)
    if budget is None or parameters <= 0:
        return "Q4_K_M"
    bpw = budget * 8 / parameters
    fitting = [q for q in BASE_MIXES if QUANT_TYPES[q].bpw <= bpw]
    return fitting[-1] if fitting else BASE_MIXES[0]
