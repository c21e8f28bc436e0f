"""MoE expert coverage from the importance matrix: how many calibration tokens each expert of
each layer was routed (llama-imatrix records, per merged expert tensor
``blk.N.ffn_*_exps.weight``, a ``.counts`` tensor of one float32 count per expert). An expert
no calibration token reached gets no importance data, a known cause of broken quantizations."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from ...coverage import LayerCoverage
from ...ggufinfo import read_info

_COUNTS = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down)_exps\.weight\.counts$")
F32 = 0


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
