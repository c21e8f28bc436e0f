"""GGUF's declaration and options: what `qwrap --help` and the request need of it (its name,
option group and options value), and the checks and decisions that need no model."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ...errors import UsageError
from ...options import Option
from .quants import IMATRIX_BY_DEFAULT, QUANT_TYPES, normalize_quant

NAME = "gguf"
TITLE = "GGUF (llama.cpp)"
SUMMARY = "llama.cpp files: one 16-bit conversion, then any of the quant types in `qwrap formats`"
BACKENDS: tuple[str, ...] = ()
LIBRARY = "gguf"
WORK = ".checkpoint/work"  # intermediates, removed after a successful run unless --keep-intermediate
OUTTYPES = ("auto", "f16", "bf16", "f32")
NO_IMATRIX = "none"
WEIGHTS_CHOICES = ("auto", "on", "off")
MMPROJ_TYPES = ("f16", "q8_0")  # the converter's --outtype for a vision model's projector

OPTIONS: tuple[Option, ...] = (
    Option("quant", list[str], [], "GGUF type, repeatable, case-insensitive (see `qwrap formats`). Default: "
           "Q4_K_M, unless a --target-* is given.", ("--quant", "-q")),
    Option("outtype", str, "auto", "GGUF 16-bit intermediate: auto (bf16 if the weights are bf16, else f16), "
           "f16, bf16, f32."),
    Option("imatrix", Optional[str], None, "GGUF importance matrix FILE, or `auto` to compute it from --calib. "
           "Default: computed for types of 4 bits and less (Q4_K_*, Q3_K_*, Q2_K*, IQ*) when calibration text is "
           "available (--calib, or WikiText-2)."),
    Option("no_imatrix", bool, False, "GGUF: never use an importance matrix (types that need one are refused).",
           ("--no-imatrix",)),
    Option("eval_weights", str, "auto", "GGUF weights view: every artifact also dequantized into transformers and "
           "scored on the same tokens (quality.weights). auto: where a CUDA GPU is present (on a CPU it runs the model "
           "in float32 torch twice per artifact, several times the cost of quantizing); on; off."),
    Option("split_max_size", str, "48G", "GGUF: a file larger than this (N followed by M or G, as llama-gguf-split "
           "takes it; the Hub refuses files over 50 GB) is split after validation into NAME-00001-of-0000N.gguf."),
    Option("recipe", Optional[str], None, "GGUF per-tensor types FILE applied on top of every --quant type: one "
           "REGEX=TYPE rule a line (`ffn_down=q5_K`, `blk\\.[0-3]\\.attn_v=q6_K`; the regex is searched in the GGUF "
           "tensor name, the first matching rule wins, # starts a comment), as llama-quantize --tensor-type-file reads "
           "them. Checked before any work; written beside each artifact.", metavar="FILE"),
    Option("target_size", list[str], [], "GGUF size budget, repeatable: the lowest-KLD per-tensor recipe whose file "
           "fits, searched for this model from measured sensitivity (bytes, or K/M/G decimal, KiB/MiB/GiB binary: "
           "4.5G). Measured beside the stock type nearest its size; the stock file ships if the search is not better "
           "beyond noise.", metavar="SIZE"),
    Option("target_bpw", list[str], [], "GGUF budget in bits per weight (file bytes x 8 / parameters), repeatable: "
           "as --target-size.", metavar="BITS"),
    Option("target_kld", list[str], [], "GGUF quality budget, repeatable: the smallest recipe predicted to stay under "
           "this mean KLD; the measured KLD is checked against it (exit 17 when it is over).", metavar="KLD"),
    Option("min_expert_tokens", int, 16, "MoE models: warn when an expert of a layer got fewer calibration tokens "
           "than this (GGUF: the importance matrix's counts; AWQ/GPTQ: GPTQModel's per-module samples); the "
           "result's expert_coverage says which.", metavar="N"),
    Option("strict_coverage", bool, False, "MoE models: with an expert under --min-expert-tokens, fail before any "
           "quantization is written (instead of warning)."),
    Option("compare", bool, True, "GGUF budgets: also quantize and measure the stock type nearest each searched "
           "file's size on the same tokens (--no-compare skips it, and the never-worse check with it)."),
    Option("mmproj", bool, True, "GGUF vision models (config.json has a vision_config): also write the vision "
           "projector mmproj-<model>-<TYPE>.gguf beside the text files, validated by loading it with a text file in "
           "llama-mtmd-cli on an image (--no-mmproj: the text model only)."),
    Option("mmproj_type", str, "f16", "GGUF vision models: the projector's type, f16 (default) or q8_0.",
           metavar="TYPE"),
)


@dataclass(frozen=True)
class Options:
    quants: tuple[str, ...] = ("Q4_K_M",)
    outtype: str = "auto"
    imatrix: str | None = None  # a file path, "auto", "none" (--no-imatrix), or None: by default
    eval_weights: str = "auto"  # the weights view: auto (where a GPU is present), on, off
    split_max_size: str = "48G"  # llama-gguf-split's N(M|G)
    recipe: str | None = None  # --recipe FILE (absolute), applied to every --quant type
    targets: tuple[str, ...] = ()  # budgets, normalized (budgets.Target.key): "size=4500000000", "bpw=4.8", "kld=0.01"
    compare: bool = True  # budgets are measured beside the stock type nearest their size
    min_expert_tokens: int = 16  # MoE: an expert with fewer calibration tokens is reported
    strict_coverage: bool = False  # ... and fails the run before quantizing
    mmproj: bool = True  # a vision model's projector is written beside the text files
    mmproj_type: str = "f16"  # its type (MMPROJ_TYPES)


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    imatrix = values.get("imatrix")
    if values.get("no_imatrix"):
        if imatrix is not None:
            raise UsageError("--imatrix and --no-imatrix contradict each other", hint="Pass one of them.")
        imatrix = NO_IMATRIX
    elif imatrix not in (None, "auto"):
        imatrix = str(Path(imatrix).resolve())
    from .budgets import parse_targets

    targets = parse_targets(values.get("target_size") or (), values.get("target_bpw") or (),
                            values.get("target_kld") or ())
    quants = tuple(values.get("quant") or ()) or (() if targets else ("Q4_K_M",))
    recipe = values.get("recipe")
    return Options(quants, values.get("outtype", "auto"), imatrix,
                   values.get("eval_weights", "auto"), str(values.get("split_max_size") or "48G").upper(),
                   str(Path(recipe).resolve()) if recipe else None, tuple(t.key for t in targets),
                   bool(values.get("compare", True)), int(values.get("min_expert_tokens", 16)),
                   bool(values.get("strict_coverage", False)), bool(values.get("mmproj", True)),
                   str(values.get("mmproj_type") or "f16").lower())


def options_from_json(data: Mapping[str, Any]) -> Options:
    return Options(tuple(data.get("quants", ("Q4_K_M",))), data.get("outtype", "auto"), data.get("imatrix"),
                   eval_weights=data.get("eval_weights", "auto"), split_max_size=data.get("split_max_size", "48G"),
                   recipe=data.get("recipe"), targets=tuple(data.get("targets", ())),
                   compare=bool(data.get("compare", True)), min_expert_tokens=int(data.get("min_expert_tokens", 16)),
                   strict_coverage=bool(data.get("strict_coverage", False)), mmproj=bool(data.get("mmproj", True)),
                   mmproj_type=str(data.get("mmproj_type", "f16")))


_SPLIT_SIZE = re.compile(r"^([1-9][0-9]*)([MG])$")


def split_bytes(size: str) -> int:
    """llama-gguf-split's --split-max-size N(M|G) in bytes (decimal units, as the tool counts)."""
    m = _SPLIT_SIZE.match(size)
    if m is None:
        raise UsageError(f"--split-max-size {size!r} is not N followed by M or G", hint="For example 48G or 500M.")
    return int(m[1]) * (1000**2 if m[2] == "M" else 1000**3)


def validate(o: Options) -> None:
    """Everything that can be checked before any work."""
    quants = [normalize_quant(q) for q in o.quants]
    if not quants and not o.targets:
        raise UsageError("no GGUF quant type given", hint="Pass --quant Q4_K_M (repeatable), or a --target-size.")
    if o.targets and o.imatrix == NO_IMATRIX:
        raise UsageError("size budgets (--target-*) measure sensitivity with an importance matrix, and --no-imatrix "
                         "was given", hint="Drop --no-imatrix.")
    if o.recipe is not None:
        from .recipes import load

        if not Path(o.recipe).is_file():
            raise UsageError(f"--recipe file {o.recipe} does not exist")
        load(Path(o.recipe))  # its syntax and types; the tensors it names are checked against the model
    if o.outtype not in OUTTYPES:
        raise UsageError(f"unknown --outtype {o.outtype!r}", hint=f"Choose from: {', '.join(OUTTYPES)}.")
    needing = [q for q in quants if QUANT_TYPES[q].needs_imatrix]
    if needing and o.imatrix == NO_IMATRIX:
        raise UsageError(
            f"{', '.join(needing)} need(s) an importance matrix, and --no-imatrix was given",
            hint="Drop --no-imatrix (it is then computed from --calib), or pass `--imatrix FILE`.",
        )
    if o.eval_weights not in WEIGHTS_CHOICES:
        raise UsageError(f"unknown --eval-weights {o.eval_weights!r}", hint=f"Choose from: {', '.join(WEIGHTS_CHOICES)}.")
    if o.imatrix not in (None, "auto", NO_IMATRIX) and not Path(o.imatrix).is_file():
        raise UsageError(f"--imatrix file {o.imatrix} does not exist")
    split_bytes(o.split_max_size)
    if o.mmproj_type not in MMPROJ_TYPES:
        raise UsageError(f"unknown --mmproj-type {o.mmproj_type!r}", hint=f"Choose from: {', '.join(MMPROJ_TYPES)}.")


def default_imatrix_types(o: Options) -> list[str]:
    """The types that get an importance matrix by default (when calibration text is available)."""
    return [q for q in map(normalize_quant, o.quants) if q.startswith(IMATRIX_BY_DEFAULT)] if o.imatrix is None else []


def needs_calibration(o: Options) -> bool:
    """An importance matrix is asked for, a type cannot do without one, or a budget's
    sensitivity is measured (on calibration text, never on the evaluation text)."""
    return bool(o.targets) or o.imatrix == "auto" or (
        o.imatrix is None and any(QUANT_TYPES[normalize_quant(q)].needs_imatrix for q in o.quants))


def wants_calibration(o: Options) -> bool:
    """Low-bit types get an importance matrix by default when calibration text is available."""
    return bool(default_imatrix_types(o))


def requirements(o: Options) -> tuple[str, ...]:
    return ("llama.cpp", "convert")
