"""The recipe search, as pure functions on values (tested in-process): tensor groups, the
sensitivity model, the allocation under a budget, and the recipe it writes.

**Groups.** Every tensor llama-quantize quantizes belongs to one group: its kind (the name
without ``blk.N.`` and ``.weight``: ``attn_q``, ``ffn_down``, ``ffn_down_exps`` for routed
experts, ``ffn_down_shexp`` for shared ones, ``token_embd``, ``output``) and, for per-layer
kinds, a band of consecutive layers. So MoE routed experts, shared experts, the router (where it
is quantized) and attention are always apart.

**Sensitivity** is measured per model on calibration text (never the evaluation text) as KL
divergence against the 16-bit model (llama-perplexity on the same chunks):

- ``ref``: every quantized tensor at Q8_0;
- ``types[t]``: every group at type ``t`` (where its rows take it), the rest at Q8_0;
- ``groups[g].delta``: group ``g`` alone moved to the probe type (Q3_K), minus ``ref``.

The predicted KLD of a recipe is ``ref + alpha * sum_g delta_g * r(t_g)``, where
``r(t) = (types[t] - ref) / (types[probe] - ref)`` says how much a type loses against the probe
type and ``alpha = (types[probe] - ref) / sum_g delta_g`` corrects for the groups' effects not
adding up exactly (the prediction is exact for the all-probe-type recipe). The prediction only
ranks recipes; every shipped file is measured.

**Allocation**: minimise the predicted loss within a byte budget (or the bytes within a KLD
limit) by Lagrangian relaxation over the groups' (bytes, loss) choices, then a greedy pass that
spends what is left on the upgrades with the best loss saved per byte. Deterministic: ties are
broken by type order and group name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .ggmltypes import GGML_TYPES, GGMLType, aligned
from .recipes import Recipe, Rule

# The tensor types a search chooses from, smallest first (llama.cpp's K and IQ types that need
# no importance matrix to be sound; each is used only where a group's rows take it).
CANDIDATES = ("q2_K", "q3_K", "iq4_xs", "q4_K", "q5_K", "q6_K", "q8_0")
REFERENCE = "q8_0"
PROBE = "q3_K"
PROBE_FALLBACK = "q4_0"  # for groups whose rows do not take 256-weight blocks
MAX_BANDS = 3
# the calibration chunks each probe is measured on (llama-perplexity scores the second half)
SENSITIVITY_CTX = 512
SENSITIVITY_CHUNKS = 16
# kept out of the budget: what recipes cannot move (a KV override or two, header growth)
SIZE_MARGIN_BYTES = 4096

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    name: str  # "attn_q@0-1", "token_embd"
    kind: str
    layers: tuple[int, ...]  # () for a tensor outside the blocks
    tensors: tuple[Tensor, ...]

    @property
    def pattern(self) -> str:
        """The rule's regex: searched in the lower-cased tensor name, as llama-quantize does."""
        if not self.layers:
            return f"^{re.escape(self.kind)}\\.weight$"
        return f"^blk\\.{_layer_regex(self.layers)}\\.{re.escape(self.kind)}\\.weight$"

    def fits(self, t: GGMLType) -> bool:
        return all(t.fits(x.shape) for x in self.tensors)

    def bytes(self, t: GGMLType) -> int:
        return sum(aligned(t.tensor_bytes(x.shape)) for x in self.tensors)


def probe_count(groups: int) -> int:
    """The reference, one probe per candidate type below it, one per group."""
    return 1 + len(CANDIDATES) - 1 + groups


def _layer_regex(layers: Sequence[int]) -> str:
    return "(" + "|".join(str(i) for i in layers) + ")" if len(layers) > 1 else str(layers[0])


def kind_of(name: str) -> tuple[str, int | None]:
    m = _BLOCK.match(name)
    if m:
        return m[2], int(m[1])
    return name.removesuffix(".weight"), None


def groups_of(tensors: Sequence[Tensor], bands: int = MAX_BANDS) -> tuple[Group, ...]:
    """The tensor groups: per kind, the layers cut into ``bands`` runs of consecutive layers."""
    by_kind: dict[str, dict[int | None, list[Tensor]]] = {}
    for t in tensors:
        kind, layer = kind_of(t.name)
        by_kind.setdefault(kind, {}).setdefault(layer, []).append(t)
    found: list[Group] = []
    for kind in sorted(by_kind):
        layers = by_kind[kind]
        if None in layers:
            found.append(Group(kind, kind, (), tuple(layers.pop(None))))
        ordered = sorted(k for k in layers if k is not None)
        n = min(bands, len(ordered))
        for b in range(n):
            part = ordered[b * len(ordered) // n:(b + 1) * len(ordered) // n]
            name = f"{kind}@{part[0]}" + (f"-{part[-1]}" if len(part) > 1 else "")
            found.append(Group(name, kind, tuple(part), tuple(x for i in part for x in layers[i])))
    return tuple(found)


def probe_type(group: Group) -> GGMLType:
    t = GGML_TYPES[PROBE.lower()]
    return t if group.fits(t) else GGML_TYPES[PROBE_FALLBACK]


@dataclass(frozen=True)
class Sensitivity:
    """What the sensitivity step measured (KLD against the 16-bit model on calibration text)."""

    ref: float
    types: Mapping[str, float]  # type name -> KLD with every group at it
    delta: Mapping[str, float]  # group name -> KLD increase when that group alone is at its probe type
    tokens: int = 0

    def ratio(self, t: str) -> float:
        """How much type ``t`` loses, relative to the probe type (1.0 at the probe, 0 at Q8_0)."""
        if t == REFERENCE:
            return 0.0
        probe = self.types.get(PROBE, math.nan) - self.ref
        lost = self.types.get(t, math.nan) - self.ref
        if not (math.isfinite(probe) and math.isfinite(lost)) or probe <= 0:
            return math.nan
        return max(lost, 0.0) / probe

    @property
    def alpha(self) -> float:
        total = sum(max(d, 0.0) for d in self.delta.values())
        probe = self.types.get(PROBE, math.nan) - self.ref
        return probe / total if total > 0 and math.isfinite(probe) and probe > 0 else 1.0

    def loss(self, group: str, t: str) -> float:
        return self.alpha * max(self.delta.get(group, 0.0), 0.0) * self.ratio(t)

    def to_json(self) -> dict[str, object]:
        return {"ref": self.ref, "types": dict(self.types), "delta": dict(self.delta), "tokens": self.tokens}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Sensitivity:
        types = data["types"]
        delta = data["delta"]
        assert isinstance(types, Mapping) and isinstance(delta, Mapping)
        tokens = data.get("tokens", 0)
        return cls(float(str(data["ref"])), {str(k): float(v) for k, v in types.items()},
                   {str(k): float(v) for k, v in delta.items()}, int(str(tokens)))


@dataclass(frozen=True)
class Allocation:
    types: Mapping[str, str]  # group name -> type name
    bytes: int  # the quantized groups' data (aligned)
    predicted_kld: float


def _options(groups: Sequence[Group], s: Sensitivity, candidates: Sequence[str]) -> dict[str, list[tuple[int, float, str]]]:
    """Per group, its usable (bytes, loss, type) choices, with dominated ones removed."""
    found: dict[str, list[tuple[int, float, str]]] = {}
    for g in groups:
        rows = []
        for name in candidates:
            t = GGML_TYPES[name.lower()]
            loss = s.loss(g.name, name)
            if g.fits(t) and math.isfinite(loss):
                rows.append((g.bytes(t), loss, name))
        rows.sort(key=lambda r: (r[0], r[1], candidates.index(r[2])))
        kept: list[tuple[int, float, str]] = []
        for r in rows:  # keep a choice only if it loses less than every smaller one
            if not kept or r[1] < kept[-1][1]:
                kept.append(r)
        if not kept:
            kept = [(g.bytes(GGML_TYPES[REFERENCE]), 0.0, REFERENCE)]
        found[g.name] = kept
    return found


def _pick(options: Mapping[str, list[tuple[int, float, str]]], lam: float) -> dict[str, int]:
    return {g: min(range(len(rows)), key=lambda i: (rows[i][1] + lam * rows[i][0], rows[i][0]))
            for g, rows in options.items()}


def _totals(options: Mapping[str, list[tuple[int, float, str]]], picks: Mapping[str, int]) -> tuple[int, float]:
    return (sum(options[g][i][0] for g, i in picks.items()), sum(options[g][i][1] for g, i in picks.items()))


def allocate(groups: Sequence[Group], s: Sensitivity, *, budget_bytes: int | None = None,
             max_kld: float | None = None, candidates: Sequence[str] = CANDIDATES) -> Allocation | None:
    """The choice of a type per group: least predicted loss within ``budget_bytes`` (the
    quantized groups' bytes), or fewest bytes with a predicted KLD within ``max_kld``.
    None when nothing meets the budget."""
    options = _options(groups, s, candidates)
    smallest = {g: 0 for g in options}
    if budget_bytes is not None:
        if _totals(options, smallest)[0] > budget_bytes:
            return None
        lo, hi = 0.0, 1.0
        while _totals(options, _pick(options, hi))[0] > budget_bytes:
            hi *= 4
            if hi > 1e30:
                break
        for _ in range(100):  # smallest penalty per byte that fits
            mid = (lo + hi) / 2
            if _totals(options, _pick(options, mid))[0] <= budget_bytes:
                hi = mid
            else:
                lo = mid
        picks = _pick(options, hi)
        picks = _spend(options, picks, budget_bytes)
    else:
        assert max_kld is not None
        allowed = max_kld - s.ref
        largest = {g: len(r) - 1 for g, r in options.items()}
        if allowed < 0 or _totals(options, largest)[1] > allowed:
            return None
        if _totals(options, smallest)[1] <= allowed:
            picks = smallest
        else:
            lo, hi = -80.0, 80.0  # log2 of the penalty per byte; more penalty, fewer bytes, more loss
            for _ in range(100):  # the largest penalty that stays within the limit
                mid = (lo + hi) / 2
                if _totals(options, _pick(options, 2.0 ** mid))[1] <= allowed:
                    lo = mid
                else:
                    hi = mid
            picks = _trim(options, _pick(options, 2.0 ** lo), allowed)
    size, loss = _totals(options, picks)
    return Allocation({g: options[g][i][2] for g, i in sorted(picks.items())}, size, s.ref + loss)


def _spend(options: Mapping[str, list[tuple[int, float, str]]], picks: dict[str, int], budget: int) -> dict[str, int]:
    """Greedy: while bytes are left, take the upgrade that saves the most loss per byte."""
    picks = dict(picks)
    while True:
        used = _totals(options, picks)[0]
        best: tuple[float, str, int] | None = None
        for g in sorted(options):
            rows, i = options[g], picks[g]
            for j in range(i + 1, len(rows)):
                extra = rows[j][0] - rows[i][0]
                saved = rows[i][1] - rows[j][1]
                if extra <= 0 or used + extra > budget or saved <= 0:
                    continue
                key = (saved / extra, g, j)
                if best is None or key[0] > best[0]:
                    best = key
        if best is None:
            return picks
        picks[best[1]] = best[2]


def _trim(options: Mapping[str, list[tuple[int, float, str]]], picks: dict[str, int], allowed: float) -> dict[str, int]:
    """Greedy: while the loss allows, take the downgrade that saves the most bytes per loss added."""
    picks = dict(picks)
    while True:
        loss = _totals(options, picks)[1]
        best: tuple[float, str, int] | None = None
        for g in sorted(options):
            rows, i = options[g], picks[g]
            for j in range(i):
                saved = rows[i][0] - rows[j][0]
                added = rows[j][1] - rows[i][1]
                if saved <= 0 or loss + added > allowed:
                    continue
                key = (saved / max(added, 1e-300), g, j)
                if best is None or key[0] > best[0]:
                    best = key
        if best is None:
            return picks
        picks[best[1]] = best[2]


def recipe(groups: Sequence[Group], alloc: Allocation, comments: Sequence[str]) -> Recipe:
    """The rules of an allocation, one per group, merged per kind where every band got the same
    type (a reviewer reads `ffn_down=q5_K`, not three lines)."""
    rules: list[Rule] = []
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    for kind in sorted(by_kind):
        members = by_kind[kind]
        chosen = {alloc.types[g.name] for g in members}
        if len(chosen) == 1 and len(members) > 1:
            pattern = f"^blk\\.\\d+\\.{re.escape(kind)}\\.weight$"
            rules.append(Rule(pattern, GGML_TYPES[chosen.pop().lower()], 0))
            continue
        rules += [Rule(g.pattern, GGML_TYPES[alloc.types[g.name].lower()], 0) for g in members]
    return Recipe(tuple(rules), "searched recipe", tuple(comments))


def file_bytes(groups: Sequence[Group], types: Mapping[str, str], fixed_bytes: int) -> int:
    """A recipe's file size: the quantized groups at their types, plus what it does not move
    (the header and the unquantized tensors)."""
    return fixed_bytes + sum(g.bytes(GGML_TYPES[types[g.name].lower()]) for g in groups)
