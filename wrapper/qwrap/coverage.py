"""Mixture-of-experts calibration coverage, whichever format counted it: per layer, how many
calibration tokens each expert was routed (GGUF: the importance matrix's counts; AWQ/GPTQ:
GPTQModel's per-module sample counts). An expert that few or no calibration tokens reached gets
little or no calibration data, a known cause of broken quantizations."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_EXPERT_MODULE = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def moe_experts(config: Mapping[str, Any]) -> int:
    """How many routed experts a layer of this model has (0: not a mixture of experts)."""
    text = config.get("text_config", config)
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = text.get(key) if isinstance(text, Mapping) else None
        if isinstance(value, int) and value > 1:
            return value
    return 0


@dataclass(frozen=True)
class LayerCoverage:
    layer: int
    tokens: tuple[int, ...]  # per expert: calibration tokens routed to it

    def below(self, minimum: int) -> tuple[int, ...]:
        """The experts with fewer than ``minimum`` tokens."""
        return tuple(e for e, n in enumerate(self.tokens) if n < minimum)

    def to_json(self) -> dict[str, object]:
        return {"layer": self.layer, "tokens": list(self.tokens)}


def from_module_samples(rows: Iterable[Mapping[str, Any]], experts: int) -> tuple[LayerCoverage, ...]:
    """Per layer, each expert's calibration samples from per-module rows (``layer``, ``module``
    such as ``mlp.experts.3.gate_proj``, ``samples``): the least over the expert's modules; an
    expert with no row got none."""
    per: dict[int, dict[int, int]] = {}
    for row in rows:
        m = _EXPERT_MODULE.search(str(row.get("module", "")))
        if m is None:
            continue
        layer, expert = int(row["layer"]), int(m[1])
        samples = int(float(row.get("samples") or 0))
        known = per.setdefault(layer, {})
        known[expert] = min(known.get(expert, samples), samples)
    return tuple(LayerCoverage(layer, tuple(found.get(e, 0) for e in range(max(experts, max(found) + 1))))
                 for layer, found in sorted(per.items()))


def facts(layers: tuple[LayerCoverage, ...], minimum: int, source: str) -> dict[str, Any]:
    """What a step records of the coverage (results.ExpertCoverage reads it)."""
    return {"source": source, "min_tokens": minimum, "below": sum(len(c.below(minimum)) for c in layers),
            "layers": [c.to_json() for c in layers], "summary": summary(layers, minimum)}


def summary(layers: tuple[LayerCoverage, ...], minimum: int) -> str:
    """One line: how many experts of how many layers got fewer than ``minimum`` tokens."""
    short = [(c.layer, c.below(minimum)) for c in layers if c.below(minimum)]
    experts = sum(len(c.tokens) for c in layers)
    if not short:
        least = min((min(c.tokens) for c in layers if c.tokens), default=0)
        return f"every expert of {len(layers)} MoE layers got at least {minimum} calibration tokens (least: {least})"
    listed = "; ".join(f"layer {layer}: expert(s) {', '.join(map(str, e))}" for layer, e in short[:4])
    more = f"; and {len(short) - 4} more layers" if len(short) > 4 else ""
    return (f"{sum(len(e) for _, e in short)} of {experts} experts got fewer than {minimum} calibration tokens "
            f"({listed}{more})")
