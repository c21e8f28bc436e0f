"""Quality figures: what an evaluation measured, parsed from the tools' own output, and the
quality gates (``--max-kld``) applied to them.

Every figure is on the evaluation chunks of one run (see evaltext.py): ``kld_mean`` and
``kld_p99`` of the next-token distribution against the unquantized model, ``ppl`` and
``ppl_base`` on the same positions, ``delta_ppl``, ``top1_agreement`` (share of positions whose
most likely token agrees, 0..1), the number of scored ``tokens``, the ``ctx`` and the ``runtime``
that scored them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Figure:
    """One quality figure: its key in the result and how every renderer shows it (the terminal
    table, the model card and the quality page all render from ``FIGURES``). A new figure is its
    measurement (a worker or a tool's parsed output) and one entry here."""

    key: str
    title: str
    fmt: str  # a str.format spec for the value
    shown_in: frozenset[str] = frozenset()  # of RENDERERS; empty: kept in the result, not a column

    def text(self, quality: Quality | None, missing: str = "-") -> str:
        value = quality.figures.get(self.key) if quality is not None else None
        if value is None or not math.isfinite(value):
            return missing
        return self.fmt.format(value)


RENDERERS = frozenset({"table", "card", "page"})
FIGURES: tuple[Figure, ...] = (
    Figure("kld_mean", "KLD (mean)", "{:.4g}", RENDERERS),
    Figure("kld_p99", "KLD p99", "{:.4g}", RENDERERS),
    Figure("ppl", "PPL", "{:.2f}", frozenset({"page"})),
    Figure("ppl_base", "PPL (16-bit)", "{:.2f}"),
    Figure("delta_ppl", "ΔPPL", "{:+.4g}", RENDERERS),
    Figure("top1_agreement", "same top-1", "{:.1%}", RENDERERS),
)
FIGURE_KEYS = frozenset(f.key for f in FIGURES)
# not figures: what an evaluation records of the tokens it scored (kept in the result as is)
METADATA = frozenset({"chunks", "ids_sha256"})


def columns(renderer: str) -> tuple[Figure, ...]:
    """The figures one renderer shows, in order."""
    return tuple(f for f in FIGURES if renderer in f.shown_in)


class SchemaError(ValueError):
    """A result document (or a part of it) does not have the shape this qwrap writes."""


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SchemaError(f"{where} is {value!r}, not a number")
    return float(value)


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(f"{where} is {value!r}, not an integer")
    return value


@dataclass(frozen=True)
class Quality:
    """What one evaluation measured for one artifact: its figures (keys of ``FIGURES``), how
    many tokens were scored at which ``ctx`` in which ``runtime``, and the weights view (the same
    artifact scored in transformers), or why that view is missing."""

    figures: Mapping[str, float]
    tokens: int | None = None
    ctx: int | None = None
    runtime: str | None = None  # "llama.cpp" or "transformers"
    weights: Quality | None = None
    weights_unavailable: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # what the evaluation recorded of its tokens (METADATA)

    @property
    def kld_mean(self) -> float | None:
        return self.figures.get("kld_mean")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {k: self.figures.get(k) for k in (f.key for f in FIGURES)}
        weights: dict[str, Any] | None = None
        if self.weights is not None:
            weights = self.weights.to_json()
        elif self.weights_unavailable is not None:
            weights = {"unavailable": self.weights_unavailable}
        return {**doc, **self.meta, "tokens": self.tokens, "ctx": self.ctx, "runtime": self.runtime, "weights": weights}

    @classmethod
    def from_json(cls, data: Any, where: str = "quality") -> Quality:
        if not isinstance(data, Mapping):
            raise SchemaError(f"{where} is {type(data).__name__}, not an object")
        unknown = set(data) - FIGURE_KEYS - METADATA - {"tokens", "ctx", "runtime", "weights"}
        if unknown:
            raise SchemaError(f"{where} has unknown figures {sorted(unknown)} (add them to quality.FIGURES)")
        figures = {k: v for k in FIGURE_KEYS if (v := _number(data.get(k), f"{where}.{k}")) is not None}
        runtime = data.get("runtime")
        if runtime is not None and not isinstance(runtime, str):
            raise SchemaError(f"{where}.runtime is {runtime!r}, not a string")
        raw = data.get("weights")
        weights, unavailable = None, None
        if isinstance(raw, Mapping) and set(raw) == {"unavailable"}:
            unavailable = str(raw["unavailable"])
        elif raw is not None:
            weights = cls.from_json(raw, f"{where}.weights")
        return cls(figures, _count(data.get("tokens"), f"{where}.tokens"), _count(data.get("ctx"), f"{where}.ctx"),
                   runtime, weights, unavailable, {k: data[k] for k in METADATA if k in data})


_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_SUMMARY = {
    "ppl": re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_NUMBER}"),
    "ppl_base": re.compile(rf"^Mean PPL\(base\)\s*:\s*{_NUMBER}"),
    "delta_ppl": re.compile(rf"^Mean PPL\(Q\)-PPL\(base\)\s*:\s*{_NUMBER}"),
    "kld_mean": re.compile(rf"^Mean\s+KLD:\s*{_NUMBER}"),
    "kld_p99": re.compile(rf"^99\.0%\s+KLD:\s*{_NUMBER}"),
    "top1_agreement": re.compile(rf"^Same top p:\s*{_NUMBER}"),
}
_FINAL_PPL = re.compile(rf"Final estimate: PPL = {_NUMBER}")


def parse_kld_summary(lines: Iterable[str]) -> dict[str, float]:
    """The summary llama-perplexity prints after ``--kl-divergence`` (the last match wins)."""
    found: dict[str, float] = {}
    for line in lines:
        text = line.strip()
        for key, pattern in _SUMMARY.items():
            m = pattern.match(text)
            if m:
                found[key] = float(m[1])
    missing = sorted(set(_SUMMARY) - set(found))
    if missing:
        raise ValueError(f"llama-perplexity printed no {', '.join(missing)}")
    found["top1_agreement"] /= 100.0
    return found


def parse_base_ppl(lines: Iterable[str]) -> float:
    """The perplexity of the base run (``--kl-divergence-base``): 'Final estimate: PPL = X'."""
    value = None
    for line in lines:
        m = _FINAL_PPL.search(line)
        if m:
            value = float(m[1])
    if value is None:
        raise ValueError("llama-perplexity printed no final PPL estimate")
    return value


# -- gates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gates:
    """``--max-kld VALUE`` (every artifact) and ``--max-kld NAME=VALUE`` (a quant type such as
    Q2_K, or a format such as awq): the most specific limit applies."""

    default: float | None
    by_name: tuple[tuple[str, float], ...] = ()

    def limit(self, fmt: str, quant: str | None) -> float | None:
        named = dict(self.by_name)
        for key in (str(quant or "").upper(), fmt.upper()):
            if key in named:
                return named[key]
        return self.default

    def verdict(self, fmt: str, quant: str | None, kld: float | None) -> str | None:
        """'passed', 'failed' or None (no limit applies) for one artifact's measured mean KLD."""
        limit = self.limit(fmt, quant)
        if limit is None:
            return None
        if kld is None:
            return "failed"  # a limit was asked for and nothing was measured: never a silent pass
        return "passed" if kld <= limit else "failed"


def parse_gates(values: Sequence[str]) -> Gates:
    default: float | None = None
    named: dict[str, float] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        try:
            limit = float(number)
        except ValueError:
            raise UsageError(f"--max-kld {value!r} is not a number or NAME=NUMBER",
                             hint="Examples: --max-kld 0.05, --max-kld Q2_K=0.2, --max-kld awq=0.03.") from None
        if limit < 0:
            raise UsageError(f"--max-kld {value!r}: a KL divergence limit cannot be negative")
        if name:
            named[name.strip().upper().replace("-", "_")] = limit
        else:
            default = limit
    return Gates(default, tuple(sorted(named.items())))


def gate(row: Mapping[str, Any], gates: Gates) -> str | None:
    """'passed', 'failed' or None (no limit applies) for one artifact row of the result (JSON)."""
    quality = row.get("quality")
    kld = quality.get("kld_mean") if isinstance(quality, Mapping) else None
    return gates.verdict(str(row["format"]), row.get("quant"), kld)
