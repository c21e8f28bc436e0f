"""Recipes: per-tensor type rules on top of a GGUF type, as ``llama-quantize --tensor-type-file``
reads them (``REGEX=TYPE``; the regex is searched in the lower-cased tensor name; the first
matching rule wins). A recipe file may also hold ``#`` comments and blank lines, which qwrap
strips before handing the rules to the tool. A searched recipe is written in the same form, so a
user can review it, diff it and reuse it with ``--recipe``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import UsageError
from .ggmltypes import GGMLType, parse_type


@dataclass(frozen=True)
class Rule:
    pattern: str  # lower-cased, as llama-quantize applies it
    type: GGMLType
    line: int  # 1-based line in its file (0: made by qwrap)

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    @property
    def text(self) -> str:
        return f"{self.pattern}={self.type.name}"


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]
    source: str = "recipe"  # the file it came from, for messages
    comments: tuple[str, ...] = ()  # written above the rules (a searched recipe says how it was made)
    text: str = ""  # a parsed file's own text, comments and all (what is written beside an artifact)

    def rules_text(self) -> str:
        """What llama-quantize reads: one rule a line, nothing else."""
        return "".join(r.text + "\n" for r in self.rules)

    def to_text(self) -> str:
        if self.text:
            return self.text if self.text.endswith("\n") else self.text + "\n"
        return "".join(f"# {c}\n" if c else "#\n" for c in self.comments) + self.rules_text()

    @property
    def sha256(self) -> str:
        """Of the rules alone (comments do not change what is quantized)."""
        return hashlib.sha256(self.rules_text().encode()).hexdigest()

    def type_of(self, name: str) -> Rule | None:
        """The first rule that matches a tensor name (llama-quantize's order)."""
        return next((r for r in self.rules if r.matches(name)), None)

    def assign(self, names: Iterable[str]) -> dict[str, Rule]:
        return {n: r for n in names if (r := self.type_of(n)) is not None}


def parse(text: str, source: str = "recipe") -> Recipe:
    rules: list[Rule] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}: "
        for entry in line.split():  # llama-quantize reads whitespace-separated entries
            pattern, sep, type_name = entry.partition("=")
            if not sep or not pattern or not type_name:
                raise UsageError(f"{where}{entry!r} is not REGEX=TYPE",
                                 hint="For example `ffn_down=q5_K` or `blk\\.[0-3]\\.attn_v=q6_K`.")
            pattern = pattern.lower()
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"{where}{pattern!r} is not a valid regular expression: {exc}") from None
            rules.append(Rule(pattern, parse_type(type_name, where), number))
    if not rules:
        raise UsageError(f"{source} holds no rules", hint="Write one REGEX=TYPE rule a line, e.g. `ffn_down=q5_K`.")
    return Recipe(tuple(rules), source, text=text)


def recipe_name(artifact: str) -> str:
    """The recipe written beside an artifact: NAME.gguf -> NAME.recipe (NAME.gguf.partial ->
    NAME.recipe.partial)."""
    partial = artifact.endswith(".partial")
    return artifact.removesuffix(".partial").removesuffix(".gguf") + ".recipe" + (".partial" if partial else "")


def load(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --recipe file {path}: {exc}") from None
    return parse(text, str(path))


def check(recipe: Recipe, tensors: Mapping[str, Sequence[int]], *, imatrix: bool = True) -> None:
    """Refuse, naming the line, a rule that matches no quantized tensor of this model, and a
    type a matched tensor's rows cannot take (llama-quantize would fall back silently) or that
    needs an importance matrix this run will not have. ``tensors``: GGUF name -> shape of the
    tensors llama-quantize quantizes (``quantizable``)."""
    names = sorted(tensors)
    for rule in recipe.rules:
        where = f"{recipe.source} line {rule.line}: "
        matched = [n for n in names if rule.matches(n)]
        if not matched:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise UsageError(f"{where}{rule.pattern!r} matches no quantized tensor of this model",
                             hint=f"Tensor names are GGUF names such as {shown}.")
        # only the tensors this rule decides (an earlier rule wins)
        decided = [n for n in matched if recipe.type_of(n) is rule]
        if not decided:
            raise UsageError(f"{where}{rule.pattern!r} decides no tensor: every tensor it matches ({matched[0]}"
                             + (f" and {len(matched) - 1} more" if len(matched) > 1 else "")
                             + ") is decided by an earlier rule", hint="The first matching rule wins; reorder or drop it.")
        bad = [n for n in decided if not rule.type.fits(tensors[n])]
        if bad:
            raise UsageError(
                f"{where}{rule.type.name} needs rows of a multiple of {rule.type.block} weights; "
                f"{bad[0]} has rows of {tensors[bad[0]][0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                hint="Choose a type with a smaller block for these tensors (q8_0, q5_0, q4_0, iq4_nl: 32), "
                "or a pattern that leaves them out.")
        needing = [n for n in decided if needs_imatrix(n, rule.type)]
        if needing and not imatrix:
            raise UsageError(f"{where}{rule.type.name} needs an importance matrix ({needing[0]}), and this run "
                             "has none", hint="An importance matrix comes with --imatrix auto (from --calib text) or --imatrix FILE, "
                             "for a --quant other than Q8_0 and the 16-bit ones; or choose another type.")


# GGUF types llama-quantize writes without quantizing: it applies per-tensor types only on top of
# a quantized type (16/32-bit files skip them).
UNQUANTIZED = frozenset({"F32", "F16", "BF16"})


def check_quants(quants: Iterable[str], source: str) -> None:
    """A recipe applies on top of a quantized GGUF type (``--quant``, normalized)."""
    unquantized = [q for q in quants if q in UNQUANTIZED]
    if unquantized:
        raise UsageError(f"{source} applies on top of a quantized type; {', '.join(unquantized)} keeps every "
                         "tensor as it is (llama-quantize skips per-tensor types there)",
                         hint="Pass a quantized --quant (Q8_0, Q6_K, Q4_K_M, ...) with --recipe.")


def needs_imatrix(name: str, t: GGMLType) -> bool:
    """llama-quantize refuses these types without an importance matrix, except for the token
    embedding and the output (``tensor_requires_imatrix`` in src/llama-quant.cpp)."""
    from .ggmltypes import NEEDS_IMATRIX

    return t.name.lower() in NEEDS_IMATRIX and name not in _IMATRIX_EXEMPT


_IMATRIX_EXEMPT = frozenset({"token_embd.weight", "per_layer_token_embd.weight", "output.weight"})
# ``tensor_allows_quantization`` in the pinned src/llama-quant.cpp: names (or parts of names)
# llama-quantize never quantizes, whatever the type asked for.
_NEVER_PARTS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight",
    "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_",
    ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_NAMES = frozenset({"position_embd.weight", "token_types.weight"})
_NEVER_PARTS_BY_ARCH = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                  "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight"),
}


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of 1 do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return max(1, len(dims))


def quantizable(name: str, shape: Sequence[int], arch: str | None = None) -> bool:
    """Whether llama-quantize quantizes this GGUF tensor (2-D and 3-D weights, not norms, not
    the tensors llama.cpp keeps in float); ``shape`` in GGUF order. A port of the pinned
    ``tensor_allows_quantization``; the quantize step also asks the tool (``--dry-run``)."""
    if n_dims(shape) < 2 or not name.endswith("weight") or name in _NEVER_NAMES:
        return False
    parts = _NEVER_PARTS + _NEVER_PARTS_BY_ARCH.get(arch or "", ())
    return not any(p in name for p in parts)


def quantized_tensors(tensors: Iterable[tuple[str, Sequence[int]]], arch: str | None = None) -> dict[str, tuple[int, ...]]:
    """The tensors (GGUF name -> shape) llama-quantize quantizes, of a model's GGUF tensors."""
    return {n: tuple(s) for n, s in tensors if quantizable(n, s, arch)}
