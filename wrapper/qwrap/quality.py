"""Quality figures: what an evaluation measured, parsed from the tools' own output, and the
quality gates (``--max-kld``) applied to them.

Every figure is on the evaluation chunks of one run (see evaltext.py): ``kld_mean`` and
``kld_p99`` of the next-token distribution against the unquantized model, ``ppl`` and
``ppl_base`` on the same positions, ``delta_ppl``, ``top1_agreement`` (share of positions whose
most likely token agrees, 0..1), the number of scored ``tokens``, the ``ctx`` and the ``runtime``
that scored them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from .errors import UsageError


class Quality(TypedDict, total=False):
    kld_mean: float
    kld_p99: float
    ppl: float
    ppl_base: float
    delta_ppl: float
    top1_agreement: float
    tokens: int
    ctx: int
    runtime: str  # "llama.cpp" or "transformers"
    weights: dict[str, Any] | None  # the common-runtime view, when measured


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


def parse_kld_summary(lines: Iterable[str]) -> Quality:
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
    return Quality(**found)  # type: ignore[typeddict-item]


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
    """'passed', 'failed' or None (no limit applies) for one artifact row of the result."""
    limit = gates.limit(str(row["format"]), row.get("quant"))
    if limit is None:
        return None
    quality = row.get("quality") or {}
    kld = quality.get("kld_mean") if isinstance(quality, dict) else None
    if kld is None:
        return "failed"  # a limit was asked for and nothing was measured: never a silent pass
    return "passed" if kld <= limit else "failed"
