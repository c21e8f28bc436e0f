"""MoE expert coverage from the importance matrix: how many calibration tokens each expert of
each layer was routed (llama-imatrix records, per merged expert tensor
``blk.N.ffn_*_exps.weight``, a ``.counts`` tensor of one float32 count per expert). An expert
no calibration token reached gets no importance data, a known cause of broken quantizations."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ...ggufinfo import read_info

_COUNTS = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down)_exps\.weight\.counts$")
F32 = 0


@dataclass(frozen=True)
class LayerCoverage:
    layer: int
    tokens: tuple[int, ...]  # per expert: calibration tokens routed to it

    def below(self, minimum: int) -> tuple[int, ...]:
        """The experts with fewer than ``minimum`` tokens."""
        return tuple(e for e, n in enumerate(self.tokens) if n < minimum)

    def to_json(self) -> dict[str, object]:
        return {"layer": self.layer, "tokens": list(self.tokens)}


def expert_coverage(imatrix: Path) -> tuple[LayerCoverage, ...]:
    """Per MoE layer, each expert's calibration tokens (the least over the layer's expert
    tensors); () for a model without merged experts."""
    info = read_info(imatrix)
    wanted = {t.name: t for t in info.tensors if _COUNTS.match(t.name) and t.ggml_type == F32}
    per_layer: dict[int, list[int]] = {}
    with imatrix.open("rb") as f:
        for name, t in sorted(wanted.items()):
            m = _COUNTS.match(name)
            assert m is not None
            n = 1
            for d in t.shape:
                n *= d
            f.seek(info.data_offset + t.offset)
            counts = [round(c) for c in struct.unpack(f"<{n}f", f.read(4 * n))]
            layer = int(m[1])
            known = per_layer.get(layer)
            per_layer[layer] = counts if known is None else [min(a, b) for a, b in zip(known, counts, strict=False)]
    return tuple(LayerCoverage(layer, tuple(tokens)) for layer, tokens in sorted(per_layer.items()))


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
