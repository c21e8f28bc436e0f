"""Quality figures: what an evaluation measured, parsed from the tools' own output, and the
quality gates (``--max-kld``) applied to them.

Every figure is on the evaluation chunks of one run (see evaltext.py): ``kld_mean`` and
``kld_p99`` of the next-token distribution against the unquantized model, ``ppl`` and
``ppl_base`` on the same positions, ``delta_ppl``, ``top1_agreement`` (share of positions whose
most likely token agrees, 0..1), the number of scored ``tokens``, the ``ctx`` and the ``runtime``
that scored them.

Every figure but ``kld_p99`` carries its standard error (its ``Figure.se_key``: ``kld_mean_se``,
``ppl_se``, ``ppl_base_se``, ``delta_ppl_se``, ``top1_agreement_se``), computed as
llama-perplexity computes it, over the scored positions taken as independent samples (n of
them): the mean KLD's is the sample standard deviation over sqrt(n); PPL's is PPL times the
standard error of the mean negative log-likelihood (the delta method); ΔPPL's comes from the
paired difference (the two variances less twice their covariance, the same tokens scoring
both); the top-1 agreement's is binomial, sqrt(p (1 - p) / (n - 1)). A quantile such as the p99
has none (llama-perplexity prints none, and a bootstrap over positions would claim a precision
the correlation within a chunk does not give): it is shown bare. Positions within a chunk are
not quite independent, so these errors are, if anything, a little small. A result written
before the errors were recorded still loads; its figures are then shown without one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .workers.protocol import llama_kld_header


@dataclass(frozen=True)
class Figure:
    """One quality figure: its key in the result and how every renderer shows it (the terminal
    table, the model card and the quality page all render from ``FIGURES``). A new figure is its
    measurement (a worker or a tool's parsed output) and one entry here."""

    key: str
    title: str
    fmt: str  # a str.format spec for the value
    shown_in: frozenset[str] = frozenset()  # of RENDERERS; empty: kept in the result, not a column
    se_key: str | None = None  # its standard error's key in the result; None: the figure has none

    def value(self, quality: Quality | None) -> float | None:
        value = quality.figures.get(self.key) if quality is not None else None
        return value if value is not None and math.isfinite(value) else None

    def se(self, quality: Quality | None) -> float | None:
        """Its standard error in ``quality`` (None: not recorded, or the figure has none)."""
        if self.se_key is None or quality is None:
            return None
        se = quality.figures.get(self.se_key)
        return se if se is not None and math.isfinite(se) and se >= 0 else None

    def text(self, quality: Quality | None, missing: str = "-", *, se: bool = True) -> str:
        """The value as every renderer shows it, "value ± se" when its standard error is known
        (the error to two significant digits, in the value's unit: percentage points for a
        share)."""
        value = self.value(quality)
        if value is None:
            return missing
        shown = self.fmt.format(value)
        error = self.se(quality) if se else None
        return shown if error is None else f"{shown} ± {self.se_text(error, like=shown)}"

    def se_text(self, error: float, like: str = "") -> str:
        """A standard error of this figure to two significant digits (in exponent notation
        when the value it goes with, ``like``, is written so)."""
        if self.fmt.endswith("%}"):
            return _two_digits(100.0 * error) + "%"
        if "e" in like and error > 0:
            return f"{error:.1e}"
        return _two_digits(error)


def _two_digits(x: float) -> str:
    """``x`` >= 0 to two significant digits, in fixed notation down to 1e-7: 43, 4.3, 0.00017."""
    if x == 0:
        return "0"
    if x < 1e-7:
        return f"{x:.1e}"
    decimals = 1 - math.floor(math.log10(x))
    return f"{round(x, decimals):.{max(decimals, 0)}f}"


RENDERERS = frozenset({"table", "card", "page"})
FIGURES: tuple[Figure, ...] = (
    Figure("kld_mean", "KLD (mean)", "{:.4g}", RENDERERS, "kld_mean_se"),
    Figure("kld_p99", "KLD p99", "{:.4g}", RENDERERS),  # a quantile: no standard error (see above)
    Figure("ppl", "PPL", "{:.2f}", frozenset({"page"}), "ppl_se"),
    Figure("ppl_base", "PPL (16-bit)", "{:.2f}", se_key="ppl_base_se"),
    Figure("delta_ppl", "ΔPPL", "{:+.4g}", RENDERERS, "delta_ppl_se"),
    Figure("top1_agreement", "same top-1", "{:.1%}", RENDERERS, "top1_agreement_se"),
)
FIGURE_KEYS = frozenset(f.key for f in FIGURES)
# each figure's standard error, kept in the result beside it (absent in results written before)
SE_KEYS = frozenset(f.se_key for f in FIGURES if f.se_key)
# not figures: what an evaluation records of the tokens it scored (kept in the result as is)
METADATA = frozenset({"chunks", "ids_sha256"})


def columns(renderer: str) -> tuple[Figure, ...]:
    """The figures one renderer shows, in order."""
    return tuple(f for f in FIGURES if renderer in f.shown_in)


def figure(key: str) -> Figure:
    """The figure of ``key`` in the column spec."""
    for f in FIGURES:
        if f.key == key:
            return f
    raise KeyError(f"{key!r} is not a quality figure (quality.FIGURES)")


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

    figures: Mapping[str, float]  # by key of FIGURES, and of their standard errors (SE_KEYS)
    tokens: int | None = None
    ctx: int | None = None
    runtime: str | None = None  # "llama.cpp" or "transformers"
    weights: Quality | None = None
    weights_unavailable: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # what the evaluation recorded of its tokens (METADATA)

    @property
    def kld_mean(self) -> float | None:
        return self.figures.get("kld_mean")

    @property
    def kld_mean_se(self) -> float | None:
        return figure("kld_mean").se(self)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {k: self.figures.get(k) for f in FIGURES for k in (f.key, f.se_key) if k}
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
        numbers = FIGURE_KEYS | SE_KEYS
        unknown = set(data) - numbers - METADATA - {"tokens", "ctx", "runtime", "weights"}
        if unknown:
            raise SchemaError(f"{where} has unknown figures {sorted(unknown)} (add them to quality.FIGURES)")
        figures = {k: v for k in numbers if (v := _number(data.get(k), f"{where}.{k}")) is not None}
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
_PLUS_MINUS = rf"(?:\s*(?:±|\+/-)\s*{_NUMBER})?"  # the standard error llama-perplexity prints after a mean
_SUMMARY = {
    "ppl": re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_NUMBER}{_PLUS_MINUS}"),
    "ppl_base": re.compile(rf"^Mean PPL\(base\)\s*:\s*{_NUMBER}{_PLUS_MINUS}"),
    "delta_ppl": re.compile(rf"^Mean PPL\(Q\)-PPL\(base\)\s*:\s*{_NUMBER}{_PLUS_MINUS}"),
    "kld_mean": re.compile(rf"^Mean\s+KLD:\s*{_NUMBER}{_PLUS_MINUS}"),
    "kld_p99": re.compile(rf"^99\.0%\s+KLD:\s*{_NUMBER}"),
    "top1_agreement": re.compile(rf"^Same top p:\s*{_NUMBER}{_PLUS_MINUS}"),
}
_PERCENT = frozenset({"top1_agreement"})  # printed in percent, kept as a share
_FINAL_PPL = re.compile(rf"Final estimate: PPL = {_NUMBER}{_PLUS_MINUS}")


def parse_kld_summary(lines: Iterable[str]) -> dict[str, float]:
    """The summary llama-perplexity prints after ``--kl-divergence`` (the last match wins): one
    flat dict of the figures and, where the tool printed one (``mean ± error``), each figure's
    standard error under its ``se_key`` (``kld_mean_se``, ...)."""
    found: dict[str, float] = {}
    for line in lines:
        text = line.strip()
        for key, pattern in _SUMMARY.items():
            m = pattern.match(text)
            if m:
                scale = 0.01 if key in _PERCENT else 1.0
                found[key] = float(m[1]) * scale
                se_key = figure(key).se_key
                if se_key is not None:
                    if m.lastindex == 2:
                        found[se_key] = float(m[2]) * scale
                    else:
                        found.pop(se_key, None)
    missing = sorted(set(_SUMMARY) - set(found))
    if missing:
        raise ValueError(f"llama-perplexity printed no {', '.join(missing)}")
    return found


def parse_base_estimate(lines: Iterable[str]) -> tuple[float, float | None]:
    """The perplexity of the base run (``--kl-divergence-base``) and its standard error:
    'Final estimate: PPL = X +/- Y' (the error None when the tool printed none)."""
    found: tuple[float, float | None] | None = None
    for line in lines:
        m = _FINAL_PPL.search(line)
        if m:
            found = float(m[1]), float(m[2]) if m.lastindex == 2 else None
    if found is None:
        raise ValueError("llama-perplexity printed no final PPL estimate")
    return found


def parse_base_ppl(lines: Iterable[str]) -> float:
    """The perplexity of the base run (``--kl-divergence-base``): 'Final estimate: PPL = X'."""
    return parse_base_estimate(lines)[0]


# The pinned llama-perplexity sometimes exits 0 without printing its last lines (the summary),
# to a pipe, a pty or its --log-file alike: 1 in 12 runs on an idle 2-core VM, more than half
# under load. The measurement is deterministic, so a run without its result is repeated, by
# qwrap's steps and by the tests that run the tool by hand.
PERPLEXITY_ATTEMPTS = 6


def base_chunks(path: Path) -> int:
    """How many chunks a llama-perplexity base file (``--kl-divergence-base``) holds. A text
    shorter than the chunks asked for gives fewer, and every later KLD run measures exactly
    these."""
    return llama_kld_header(path)[2]


# -- noise ------------------------------------------------------------------------------

NOISE_SIGMAS = 2.0  # a difference within this many combined standard errors is within noise


def combined_se(a: Quality, b: Quality, key: str = "kld_mean") -> float | None:
    """The standard error of the difference of figure ``key`` between ``a`` and ``b`` taken as
    independent measurements, sqrt(se_a² + se_b²); None when either has no standard error."""
    f = figure(key)
    sa, sb = f.se(a), f.se(b)
    return None if sa is None or sb is None else math.hypot(sa, sb)


def within_noise(a: Quality, b: Quality, key: str = "kld_mean", *, sigmas: float = NOISE_SIGMAS) -> bool:
    """True when figure ``key`` of ``a`` and ``b`` differ by no more than ``sigmas`` (2) combined
    standard errors (``combined_se``): the measurement cannot tell them apart. False when they
    differ by more, and when either value or either standard error is unknown (nothing then
    says the difference is noise).

    The rule treats the two as independent. Two artifacts scored on the same tokens (the same
    run's evaluation, one runtime) are paired samples whose per-token figures are positively
    correlated, so the true error of their difference is smaller than the combined one: the
    rule is conservative, it may call a real but small difference noise, never the reverse.
    Compare figures of one runtime: llama.cpp and transformers score their own references."""
    f = figure(key)
    va, vb = f.value(a), f.value(b)
    se = combined_se(a, b, key)
    if va is None or vb is None or se is None:
        return False
    return abs(va - vb) <= sigmas * se


def noise_neighbours(items: Sequence[tuple[str, Quality | None]], key: str = "kld_mean") -> dict[str, list[str]]:
    """For labelled measurements (a run's artifacts), the labels each is within noise of
    (``within_noise`` on ``key``), among those of the same runtime, in the order given; a label
    that is within noise of none is left out."""
    found: dict[str, list[str]] = {}
    for i, (label, q) in enumerate(items):
        for j, (other, r) in enumerate(items):
            if i != j and q is not None and r is not None and q.runtime == r.runtime and within_noise(q, r, key):
                found.setdefault(label, []).append(other)
    return found


def noise_pairs(items: Sequence[tuple[str, Quality | None]], key: str = "kld_mean") -> list[tuple[str, str]]:
    """The pairs of labels within noise of each other (``noise_neighbours``), each pair once, in
    the order given."""
    order = {label: i for i, (label, _) in enumerate(items)}
    return [(a, b) for a, others in noise_neighbours(items, key).items() for b in others if order[a] < order[b]]


def noise_text(items: Sequence[tuple[str, Quality | None]]) -> str:
    """The labelled measurements whose mean KLDs cannot be told apart, in one sentence without
    its full stop ("" when there are none), as the table and the card say it."""
    pairs = noise_pairs(items)
    if not pairs:
        return ""
    return (f"within noise (mean KLDs less than {NOISE_SIGMAS:g} combined standard errors apart): "
            + ", ".join(f"{a} ≈ {b}" for a, b in pairs))


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
