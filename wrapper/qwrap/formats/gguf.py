"""GGUF: convert once to 16-bit with the pinned converter, optionally compute an importance
matrix, quantize each requested type with llama-quantize, validate each artifact.

Steps (ids): ``gguf.convert`` -> [``gguf.imatrix``] -> ``gguf.quantize:<T>`` ->
``gguf.validate:<T>`` [-> ``gguf.split:<T>`` when the file is planned over --split-max-size].
The 16-bit intermediate lives in ``.checkpoint/work/``; each quantized file is written as
``<final>.partial`` and renamed by its validate step (into ``.checkpoint/work/`` when a split
step then turns it into ``<final>-00001-of-0000N.gguf`` shards).
This module owns everything GGUF: options, checks, steps, estimates, actions and rows.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .. import evaltext
from ..checks import Check
from ..context import Inputs, StepContext, StepOutcome
from ..errors import (
    ModelFilesError,
    QwrapError,
    StepFailedError,
    ToolKilledError,
    UnsupportedModelError,
    UsageError,
    ValidationFailedError,
)
from ..options import Listing, Option
from ..plan import Estimate, Plan, PlanBuilder, Step
from . import hfquant

if TYPE_CHECKING:  # loaded by the functions that need them: `qwrap --help` imports this module
    from ..ggufinfo import GGUFInfo
    from ..model import ModelInfo, Shape
    from ..supervisor import ProcessResult
    from ..toolchain import Toolchain

MiB = 1 << 20
WORK = ".checkpoint/work"  # intermediates, removed after a successful run unless --keep-intermediate

NAME = "gguf"
TITLE = "GGUF (llama.cpp)"
SUMMARY = "llama.cpp files: one 16-bit conversion, then any of the quant types in `qwrap formats`"
BACKENDS: tuple[str, ...] = ()
IMATRIX_CHUNKS = 128
VALIDATE_PROMPT = "Once upon a time"
OUTTYPES = ("auto", "f16", "bf16", "f32")
# Its base file holds llama.cpp's token ids of the evaluation chunks: other runtimes score those.
EVAL_TOKENS = "eval-tokens:llama-kld"
K_QUANT_OUTPUT_BPW = 6.5625  # output.weight of K-quant mixes is Q6_K


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype, as written to general.file_type
    bpw: float  # bits per weight of the main tensors (the file is a little larger)
    needs_imatrix: bool
    note: str


def _q(name: str, ftype: int, bpw: float, note: str, needs: bool = False) -> QuantType:
    return QuantType(name, ftype, bpw, needs, note)


QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        _q("F32", 0, 32.0, "no quantization, 32-bit float"),
        _q("F16", 1, 16.0, "no quantization, 16-bit float"),
        _q("BF16", 32, 16.0, "no quantization, bfloat16"),
        _q("Q8_0", 7, 8.5, "near-lossless, large"),
        _q("Q6_K", 18, 6.56, "very low loss"),
        _q("Q5_K_M", 17, 5.69, "low loss, recommended for quality"),
        _q("Q5_K_S", 16, 5.54, "low loss"),
        _q("Q5_1", 9, 6.0, "legacy 5-bit"),
        _q("Q5_0", 8, 5.5, "legacy 5-bit"),
        _q("Q4_K_M", 15, 4.89, "balanced size/quality, the usual default"),
        _q("Q4_K_S", 14, 4.58, "smaller 4-bit"),
        _q("Q4_1", 3, 5.0, "legacy 4-bit"),
        _q("Q4_0", 2, 4.5, "legacy 4-bit"),
        _q("Q3_K_L", 13, 4.27, "3-bit, larger mix"),
        _q("Q3_K_M", 12, 3.91, "3-bit"),
        _q("Q3_K_S", 11, 3.5, "3-bit, smallest mix"),
        _q("Q2_K", 10, 3.0, "2-bit, high loss"),
        _q("Q2_K_S", 21, 2.75, "2-bit, high loss", True),
        _q("IQ4_NL", 25, 4.5, "non-linear 4-bit"),
        _q("IQ4_XS", 30, 4.25, "non-linear 4-bit, small"),
        _q("IQ3_M", 27, 3.66, "3-bit i-quant mix"),
        _q("IQ3_S", 26, 3.44, "3-bit i-quant"),
        _q("IQ3_XS", 22, 3.3, "3-bit i-quant"),
        _q("IQ3_XXS", 23, 3.06, "3-bit i-quant", True),
        _q("IQ2_M", 29, 2.7, "2-bit i-quant mix", True),
        _q("IQ2_S", 28, 2.5, "2-bit i-quant", True),
        _q("IQ2_XS", 20, 2.31, "2-bit i-quant", True),
        _q("IQ2_XXS", 19, 2.06, "2-bit i-quant", True),
        _q("IQ1_M", 31, 1.75, "1-bit i-quant, very high loss", True),
        _q("IQ1_S", 24, 1.56, "1-bit i-quant, very high loss", True),
    )
}

ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}
# Types llama-quantize quantizes without importance weights: an imatrix changes nothing.
IMATRIX_IGNORED = {"F32", "F16", "BF16", "Q8_0"}
# Types of 4 bits and less, where an importance matrix measurably lowers the error: computed for
# them by default whenever calibration text is available (--no-imatrix opts out).
IMATRIX_BY_DEFAULT = ("Q4_K", "Q3_K", "Q2_K", "IQ")
NO_IMATRIX = "none"
OUTTYPE_NAMES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}

OPTIONS: tuple[Option, ...] = (
    Option("quant", list[str], ["Q4_K_M"], "GGUF type, repeatable, case-insensitive (see `qwrap formats`).",
           ("--quant", "-q")),
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
)
WEIGHTS_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class Options:
    quants: tuple[str, ...] = ("Q4_K_M",)
    outtype: str = "auto"
    imatrix: str | None = None  # a file path, "auto", "none" (--no-imatrix), or None: by default
    eval_weights: str = "auto"  # the weights view: auto (where a GPU is present), on, off
    split_max_size: str = "48G"  # llama-gguf-split's N(M|G)


def normalize_quant(name: str) -> str:
    key = name.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise UsageError(
            f"unknown GGUF quant type {name!r}",
            hint="Valid types (case-insensitive): " + ", ".join(QUANT_TYPES) + ". See `qwrap formats`.",
        )
    return key


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    imatrix = values.get("imatrix")
    if values.get("no_imatrix"):
        if imatrix is not None:
            raise UsageError("--imatrix and --no-imatrix contradict each other", hint="Pass one of them.")
        imatrix = NO_IMATRIX
    elif imatrix not in (None, "auto"):
        imatrix = str(Path(imatrix).resolve())
    return Options(tuple(values.get("quant") or ()), values.get("outtype", "auto"), imatrix,
                   values.get("eval_weights", "auto"), str(values.get("split_max_size") or "48G").upper())


def options_from_json(data: Mapping[str, Any]) -> Options:
    return Options(tuple(data.get("quants", ("Q4_K_M",))), data.get("outtype", "auto"), data.get("imatrix"),
                   eval_weights=data.get("eval_weights", "auto"), split_max_size=data.get("split_max_size", "48G"))


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
    if not quants:
        raise UsageError("no GGUF quant type given", hint="Pass --quant Q4_K_M (repeatable).")
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


def _default_imatrix_types(o: Options) -> list[str]:
    return [q for q in map(normalize_quant, o.quants) if q.startswith(IMATRIX_BY_DEFAULT)] if o.imatrix is None else []


def needs_calibration(o: Options) -> bool:
    """An importance matrix is asked for, or a type cannot do without one."""
    return o.imatrix == "auto" or (o.imatrix is None and any(QUANT_TYPES[normalize_quant(q)].needs_imatrix
                                                             for q in o.quants))


def wants_calibration(o: Options) -> bool:
    """Low-bit types get an importance matrix by default when calibration text is available."""
    return bool(_default_imatrix_types(o))


def requirements(o: Options) -> tuple[str, ...]:
    return ("llama.cpp", "convert")


# -- checks --------------------------------------------------------------------------


def _unsupported(arch: str | None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"architecture {arch} is not supported by the pinned llama.cpp converter",
        hint="`qwrap formats --architectures` lists what is; a newer llama.cpp may add it "
        "(QWRAP_LLAMA_CPP_DIR).",
    )


def _architecture_check(model: ModelInfo) -> Check:
    from ..toolchain import supported_architectures

    arch = model.architecture
    try:
        supported = supported_architectures()
    except QwrapError as exc:  # an unreadable registry is not a refusal: the converter will say
        return Check("architecture", False, f"cannot read the converter's list: {exc.message}")
    ok = arch in supported
    return Check("architecture", ok, f"{arch} is {'' if ok else 'not '}supported by the pinned converter",
                 None if ok else _unsupported(arch))


def _tokenizer_check(model: ModelInfo) -> Check:
    """A vocab-only conversion (seconds, no weights needed) catches tokenizers the pinned
    converter rejects, such as unknown BPE pre-tokenizers, before hours of work."""
    from .. import envs
    from ..children import run_checked
    from ..toolchain import cache_root, find_toolchain

    try:
        converter = find_toolchain().converter
        python = envs.find_env("convert").python
    except QwrapError as exc:
        return Check("tokenizer", False, f"not checked: {exc.message}")
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"vocab-check-{model.source.name}.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwrap-vocab-") as tmp:
        try:
            run_checked([python, converter, model.source.path, "--vocab-only", "--outfile", Path(tmp) / "v.gguf"],
                        what="vocab-only conversion", log_path=log, timeout=600)
        except QwrapError as exc:
            return Check("tokenizer", False, exc.message, exc)
    return Check("tokenizer", True, "the pinned converter accepts the tokenizer")


def checks(o: Options, model: ModelInfo, *, thorough: bool) -> list[Check]:
    found = [_architecture_check(model)]
    if thorough and found[0].ok:
        found.append(_tokenizer_check(model))
    return found


# -- steps and estimates ---------------------------------------------------------------


def source_outtype(o: Options, shape: Shape, config: Mapping[str, Any]) -> str:
    """bf16 when the source weights are bf16, else f16 (unless --outtype says otherwise)."""
    if o.outtype != "auto":
        return o.outtype
    if shape.main_dtype:
        return "bf16" if shape.main_dtype == "BF16" else "f16"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return "bf16" if dtype == "bfloat16" else "f16"


def artifact_name(model_name: str, quant: str) -> str:
    return f"{model_name}-{quant}.gguf"


def split_name(final: str, index: int, count: int) -> str:
    """llama.cpp's shard names: NAME-00001-of-00003.gguf (the first one is what loaders are given)."""
    return f"{final.removesuffix('.gguf')}-{index:05d}-of-{count:05d}.gguf"


def gguf_bytes(shape: Shape, quant: str) -> int:
    """Expected file size of one GGUF type: 1-D norms stay F32, the output matrix of K-quant
    mixes is Q6_K, everything else takes the type's bits per weight."""
    bpw = QUANT_TYPES[quant].bpw
    out_bpw = K_QUANT_OUTPUT_BPW if "_K" in quant and bpw < K_QUANT_OUTPUT_BPW else bpw
    matrices = shape.parameters - shape.norms - shape.output
    data = matrices * bpw / 8 + shape.output * out_bpw / 8 + shape.norms * 4
    return int(data) + shape.metadata_bytes


def intermediate_bytes(shape: Shape, outtype: str) -> int:
    norms_f32 = shape.norms * 2  # norms are written as F32 even in a 16-bit file
    return shape.parameters * (4 if outtype == "f32" else 2) + (0 if outtype == "f32" else norms_f32) \
        + shape.metadata_bytes


# Cost model, fitted to measurements on a 2-core VM (bench/results/scaling.json and
# dag_gguf.json: bf16 Llama models of 7M, 110M, 400M and 1B parameters):
# - the converter is Python with ~3.9 s of fixed start-up (torch + transformers imports) and
#   then ~200 MB/s; its memory is ~308 MB of libraries plus two f32 copies of the biggest tensor;
# - llama-quantize, alone with both cores, takes the seconds per 100M parameters below, and
#   converts one tensor at a time: ~18 MiB plus the biggest tensor in f32, 16-bit and quantized;
# - llama-simple maps the whole artifact (and repacks 4-bit K/legacy types for the CPU, a
#   second copy of most of the file), starts in ~0.35 s and loads ~600 MB/s.
# Types not measured have no time estimate.
CONVERT_STARTUP_S = 3.9
CONVERT_BYTES_PER_S = 200e6
CONVERT_BASE_RAM = 308_000_000
QUANTIZE_S_PER_100M = {"Q2_K": 2.9, "Q3_K_M": 2.4, "Q4_K_M": 4.2, "Q5_K_M": 3.2, "Q6_K": 2.1, "Q8_0": 0.52}
QUANTIZE_BASE_RAM = 18 * MiB
TOOL_BASE_RAM = 12 * MiB
LOADER_BASE_RAM = 20 * MiB  # llama-simple before the model: its context and compute buffers
REPACKED = {"Q4_0", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS"}  # the CPU backend keeps a repacked copy
VALIDATE_STARTUP_S = 0.35
VALIDATE_BYTES_PER_S = 600e6
EVAL_S_PER_GTOKEN_PARAM = 0.033  # llama-perplexity: seconds per (1e9 parameters x tokens), both cores
# The weights view (transformers): ~8 s to start and load the source, then gguf-py dequantizes
# the artifact at ~6e6 parameters/s, and the source (once per run, then cached) and the
# dequantized copy each run a forward pass over the chunks.
WEIGHTS_STARTUP_S = 8.0
DEQUANT_PARAMS_PER_S = 6e6
SPLIT_BYTES_PER_S = 500e6  # llama-gguf-split copies tensor data


def estimate(kind: str, params: Mapping[str, Any], shape: Shape) -> Estimate:
    """The one estimator of every GGUF step kind (plan, run's disk check, disk-full messages).
    ``output_bytes`` is what the step's outputs weigh (a validate step names the renamed
    artifact); ``peak_disk_bytes`` is what it adds to the disk."""
    inter = intermediate_bytes(shape, params.get("outtype") or "f16")
    if kind == "gguf.convert":
        return Estimate(inter, CONVERT_BASE_RAM + 8 * shape.largest_tensor, inter,
                        CONVERT_STARTUP_S + shape.weight_bytes / CONVERT_BYTES_PER_S)
    if kind == "gguf.imatrix":
        size = shape.parameters // 50
        return Estimate(size, TOOL_BASE_RAM + inter, size, None)
    if kind == "gguf.eval-base":
        return _eval_estimate(params, shape, base=True)
    quant = params["quant"]
    size = gguf_bytes(shape, quant)
    if kind == "gguf.eval":
        return _eval_estimate(params, shape, base=False, model_bytes=size)
    if kind == "gguf.split":  # the shards; the single file is an intermediate, removed at the end
        return Estimate(size, TOOL_BASE_RAM, size, size / SPLIT_BYTES_PER_S)
    if kind == "gguf.quantize":
        per = QUANTIZE_S_PER_100M.get(quant)
        ram = QUANTIZE_BASE_RAM + int(shape.largest_tensor * (4 + 2 + QUANT_TYPES[quant].bpw / 8))
        return Estimate(size, ram, size, per * shape.parameters / 1e8 if per is not None else None)
    repacked = 0.55 * size if quant in REPACKED else 0  # gguf.validate: loads it, renames it
    return Estimate(size, LOADER_BASE_RAM + size + int(repacked), 0, VALIDATE_STARTUP_S + size / VALIDATE_BYTES_PER_S)


def _weights_estimate(shape: Shape, params: Mapping[str, Any] | None = None) -> Estimate:
    """The source and the dequantized artifact in float32, one after the other, plus activations."""
    from ..toolchain import gpu_present

    seconds = None
    if params is not None:
        forward = evaltext.torch_seconds(shape.parameters, int(params["ctx"]) * int(params["chunks"]),
                                         gpu=gpu_present())
        seconds = WEIGHTS_STARTUP_S + shape.parameters / DEQUANT_PARAMS_PER_S + 2 * forward
    return Estimate(0, shape.parameters * 4 + 1024 * MiB, 0, seconds)


def _weights_view(o: Options, shape: Shape) -> bool:
    """Whether the plan measures the weights view: asked for (or a GPU makes it cheap) and the
    dequantized copy fits in memory."""
    import psutil

    from ..toolchain import gpu_present

    wanted = o.eval_weights == "on" or (o.eval_weights == "auto" and gpu_present())
    return wanted and _weights_estimate(shape).peak_ram_bytes <= psutil.virtual_memory().total * 0.8


WEIGHTS_UNAVAILABLE = ("not measured: the weights view runs where a CUDA GPU is present or with --eval-weights on, "
                       "and only when the dequantized copy fits in this machine's memory")


def kld_base_bytes(shape: Shape, ctx: int, chunks: int) -> int:
    """llama-perplexity's base file: the token ids, then per scored position the log-probs of
    the whole vocabulary as uint16 plus a few scale words."""
    scored = chunks * (ctx - 1 - ctx // 2)
    return 20 + 4 * ctx * chunks + scored * 2 * (2 * ((shape.vocab + 1) // 2) + 4)


def _eval_estimate(params: Mapping[str, Any], shape: Shape, *, base: bool, model_bytes: int = 0) -> Estimate:
    ctx, chunks = int(params["ctx"]), int(params["chunks"])
    logits = 4 * ctx * max(shape.vocab, 1)  # one chunk's logits in f32
    model = model_bytes or intermediate_bytes(shape, params.get("outtype") or "f16")
    seconds = EVAL_S_PER_GTOKEN_PARAM * ctx * chunks * shape.parameters / 1e9 + VALIDATE_STARTUP_S
    if base:
        size = kld_base_bytes(shape, ctx, chunks)
        return Estimate(size, TOOL_BASE_RAM + model + 2 * logits, size, seconds)
    return Estimate(0, TOOL_BASE_RAM + model + 2 * logits, 0, seconds)


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    shape, name = model.shape, model.source.name
    outtype = source_outtype(o, shape, model.config)
    intermediate = f".checkpoint/work/{name}-{OUTTYPE_NAMES[outtype]}.gguf"
    model_file = {"model": str(model.source.path)}
    params: dict[str, Any] = {"outtype": outtype}
    convert = b.add("gguf.convert", "gguf.convert", NAME, f"convert to {OUTTYPE_NAMES[outtype]} GGUF",
                    outputs=(intermediate,), params=params, files=model_file,
                    estimate=estimate("gguf.convert", params, shape))
    imatrix: Step | None = None
    default_types = _default_imatrix_types(o) if model.calibration is not None else []
    if o.imatrix == "auto" or default_types:
        calib = model.calibration
        params = {"calib": calib.identity if calib else None, "chunks": IMATRIX_CHUNKS, "outtype": outtype}
        imatrix = b.add("gguf.imatrix", "gguf.imatrix", NAME, "compute importance matrix",
                        inputs={"model": convert.id}, outputs=(".checkpoint/work/imatrix.gguf",), params=params,
                        files={"calib": calib.path} if calib and calib.path else {},
                        estimate=estimate("gguf.imatrix", params, shape), threaded=True)
    base: Step | None = None
    user_imatrix = o.imatrix if o.imatrix not in (None, "auto", NO_IMATRIX) else None
    from ..journal import sha256_file

    user_sha = sha256_file(Path(user_imatrix)) if user_imatrix else None
    for quant in dict.fromkeys(normalize_quant(q) for q in o.quants):
        final = artifact_name(name, quant)
        inputs = {"model": convert.id}
        files: dict[str, str] = {}
        params = {"quant": quant, "outtype": outtype}
        if (o.imatrix not in (None, NO_IMATRIX) and quant not in IMATRIX_IGNORED) or quant in default_types:
            if imatrix is not None:
                inputs["imatrix"] = imatrix.id
            else:
                files["imatrix"] = str(user_imatrix)
            params["imatrix_sha256"] = user_sha
        q = b.add(f"gguf.quantize:{quant}", "gguf.quantize", NAME, f"quantize {quant}",
                  inputs=inputs, outputs=(final + ".partial",), params=params, files=files,
                  estimate=estimate("gguf.quantize", params, shape), threaded=True)
        params = {"quant": quant, "outtype": outtype}
        shards = -(-q.estimate.output_bytes // split_bytes(o.split_max_size))  # planned from the estimate
        v = b.add(f"gguf.validate:{quant}", "gguf.validate", NAME, f"validate {quant}",
                  inputs={"artifact": q.id, "source": convert.id},
                  outputs=(f"{WORK}/{final}" if shards > 1 else final,), params=params,
                  estimate=estimate("gguf.validate", params, shape), deliverable=shards == 1)
        readers: dict[str, str] = {}
        if model.evaluation is not None:
            base = base or _add_eval_base(b, convert, model, outtype)
            params = {"quant": quant, "outtype": outtype, "ctx": model.evaluation.ctx,
                      "chunks": model.evaluation.chunks}
            readers["quality"] = b.add(f"gguf.eval:{quant}", "gguf.eval", NAME, f"measure {quant}",
                                       inputs={"artifact": v.id, "base": base.id}, params=params,
                                       estimate=estimate("gguf.eval", params, shape), threaded=True).id
            if _weights_view(o, shape):
                readers["weights"] = b.add(
                    f"gguf.weights:{quant}", "gguf.weights", NAME, f"measure {quant}'s weights in transformers",
                    inputs={"artifact": v.id, "tokens": base.id}, params=params, files=model_file,
                    estimate=_weights_estimate(shape, params), exclusive=hfquant.WORKERS,
                    scratch=(hfquant.REFERENCE_DIR,)).id
        if shards > 1:  # after the measurements, which read the single file
            params = {"quant": quant, "max_size": o.split_max_size}
            b.add(f"gguf.split:{quant}", "gguf.split", NAME, f"split {quant} into {o.split_max_size} shards",
                  inputs={"artifact": v.id, "quantized": q.id, **readers},
                  outputs=(split_name(final, 1, shards),), params=params, scratch=(f"{WORK}/split-{quant}",),
                  estimate=estimate("gguf.split", params, shape), deliverable=True)


def _add_eval_base(b: PlanBuilder, convert: Step, model: ModelInfo, outtype: str) -> Step:
    """The 16-bit model's next-token distributions on the evaluation chunks, once per run: every
    artifact's KL divergence is measured against this file (and it holds the token ids)."""
    ev = model.evaluation
    assert ev is not None
    params = {"text": ev.identity, "ctx": ev.ctx, "chunks": ev.chunks, "outtype": outtype}
    return b.add("gguf.eval-base", "gguf.eval-base", NAME, "measure the 16-bit model",
                 inputs={"model": convert.id}, outputs=(".checkpoint/work/eval-base.kld",), params=params,
                 files={"text": ev.path} if ev.path else {}, estimate=estimate("gguf.eval-base", params, shape=model.shape),
                 threaded=True, provides=(EVAL_TOKENS,))


# -- actions -------------------------------------------------------------------------


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    actions = {"gguf.convert": _convert, "gguf.imatrix": _imatrix, "gguf.quantize": _quantize,
               "gguf.validate": _validate, "gguf.split": _split, "gguf.eval-base": _eval_base, "gguf.eval": _eval, "gguf.weights": _weights}
    return actions[step.kind](step, inputs, ctx)


def _tools() -> Toolchain:
    from ..toolchain import find_toolchain

    return find_toolchain()


def _offload(tools: Toolchain) -> list[str]:
    """A CUDA build runs every layer on the GPU (the imatrix, the validation, the evaluation);
    a CPU build takes no such flag."""
    return ["-ngl", "999"] if tools.variant == "cuda" else []


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _convert(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from .. import envs
    from ..model import chat_template
    from ..modelfiles import read_header
    from ..progress import ConvertProgress

    tools = _tools()
    model = Path(step.file("model"))
    out = ctx.path(step.outputs[0])
    tmp = _partial(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    python = envs.find_env("convert").python
    n_tensors = sum(len(read_header(p).tensors) for p in sorted(model.glob("*.safetensors")))
    argv: list[str | os.PathLike[str]] = [python, tools.converter, model, "--outfile", tmp,
                                          "--outtype", step.param("outtype")]
    result = ctx.run_tool(argv, what="convert_hf_to_gguf.py", parser=ConvertProgress(n_tensors or None),
                          env={"PYTHONUNBUFFERED": "1"}, oom_extra="--no-lazy is off by default; close other jobs")
    info = _read_header(tmp, "the converter's output")
    template, wanted = info.metadata.get(CHAT_TEMPLATE_KEY), chat_template(model)
    if wanted is not None and template != wanted:
        raise ValidationFailedError("the converter's output does not carry the source's chat template "
                                    f"({CHAT_TEMPLATE_KEY} {'differs' if template else 'is missing'})")
    os.replace(tmp, out)
    facts = {"architecture": info.architecture, "tensor_count": len(info.tensors),
             "parameter_count": info.parameter_count, "file_type": info.file_type,
             "chat_template_sha256": _text_sha256(template)}
    return StepOutcome((out,), facts, result.peak_rss_bytes)


def _imatrix(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from ..progress import ChunkProgress

    tools = _tools()
    out = ctx.path(step.outputs[0])
    tmp = out.with_name("imatrix.partial.gguf")  # llama-imatrix picks its format from the suffix
    tmp.unlink(missing_ok=True)
    if "calib" not in dict(step.files):
        raise UsageError("computing an importance matrix needs calibration text", hint="Pass --calib FILE.txt.")
    argv: list[str | os.PathLike[str]] = [
        tools.tool("llama-imatrix"), "-m", inputs["model"].path, "-f", step.file("calib"), "-o", tmp,
        "-t", str(ctx.threads), "-c", "512", "--chunks", str(step.param("chunks")), "--log-jsonl", *_offload(tools),
    ]
    result = ctx.run_tool(argv, what="llama-imatrix", parser=ChunkProgress())
    if not tmp.is_file():
        raise ValidationFailedError(f"llama-imatrix exited 0 but wrote no {tmp}")
    os.replace(tmp, out)
    return StepOutcome((out,), {}, result.peak_rss_bytes)


def _quantize(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from ..progress import QuantizeProgress

    tools = _tools()
    out = ctx.path(step.outputs[0])
    out.unlink(missing_ok=True)  # llama-quantize can leave a partial file on failure
    quant = step.param("quant")
    argv: list[str | os.PathLike[str]] = [tools.tool("llama-quantize")]
    if "imatrix" in inputs:
        # relative to OUT (the tool runs there): llama-quantize records the path in the artifact,
        # which must not depend on where the output folder is
        argv += ["--imatrix", os.path.relpath(inputs["imatrix"].path, ctx.output)]
    elif "imatrix" in dict(step.files):
        argv += ["--imatrix", step.file("imatrix")]
    argv += [inputs["model"].path, out, quant, str(ctx.threads)]
    try:
        result = ctx.run_tool(argv, what=f"llama-quantize {quant}", parser=QuantizeProgress(), cwd=ctx.output)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    info = _read_header(out, f"llama-quantize's {quant} output")
    size = out.stat().st_size
    bpw = size * 8 / info.parameter_count if info.parameter_count else 0.0
    return StepOutcome((out,), {"bits_per_weight": round(bpw, 3), "bytes": size}, result.peak_rss_bytes)


def _read_header(path: Path, what: str) -> GGUFInfo:
    from ..ggufinfo import GGUFFormatError, read_info

    try:
        return read_info(path)
    except (OSError, GGUFFormatError) as exc:
        raise ValidationFailedError(f"{what} {path} is not a readable GGUF file: {exc}") from exc


CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def _text_sha256(text: object) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str) else None


def _load_and_generate(model: Path, what: str, ctx: StepContext) -> ProcessResult:
    """The real load: llama.cpp reads ``model`` (a split set from its first shard) and generates."""
    tools = _tools()
    argv: list[str | os.PathLike[str]] = [tools.tool("llama-simple"), "-m", model, "-n", "8", *_offload(tools),
                                          VALIDATE_PROMPT]
    try:
        result = ctx.run_tool(argv, what=f"loading {what} in llama.cpp")
    except ToolKilledError:
        raise
    except (StepFailedError, ModelFilesError) as exc:  # the artifact is what failed, not a tool
        raise ValidationFailedError(f"llama.cpp cannot load {what}: {exc.message}",
                                    hint=exc.hint, log_path=exc.log_path) from None
    if VALIDATE_PROMPT not in "\n".join(result.tail):
        raise ValidationFailedError(f"llama.cpp loaded {what} but generated nothing")
    return result


def _validate(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """Read the header back, compare with the 16-bit source, load it in llama.cpp and
    generate a few tokens; only then rename the partial file to its final name."""
    quant = step.param("quant")
    partial = inputs["artifact"].path
    final = ctx.path(step.outputs[0])
    source = inputs["source"].facts
    info = _read_header(partial, f"the {quant} artifact")
    expected = QUANT_TYPES[quant].ftype
    problems = []
    if source.get("architecture") and info.architecture != source["architecture"]:
        problems.append(f"architecture {info.architecture!r} != source {source['architecture']!r}")
    if info.file_type != expected:
        problems.append(f"file type {info.file_type} != {expected} ({quant})")
    if source.get("tensor_count") and len(info.tensors) != source["tensor_count"]:
        problems.append(f"{len(info.tensors)} tensors != {source['tensor_count']} in the 16-bit source")
    if "chat_template_sha256" in source and _text_sha256(info.metadata.get(CHAT_TEMPLATE_KEY)) != \
            source["chat_template_sha256"]:
        problems.append(f"{CHAT_TEMPLATE_KEY} differs from the source's chat template")
    if problems:
        raise ValidationFailedError(f"{quant} artifact failed header checks: " + "; ".join(problems))
    result = _load_and_generate(partial, f"the {quant} artifact", ctx)
    ctx.check_final(final)
    facts = {"validated": True, "architecture": info.architecture, "tensor_count": len(info.tensors)}
    return StepOutcome((), facts, result.peak_rss_bytes, renames=((partial, final),))


def _split(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """llama-gguf-split the validated file into shards, load the set from its first shard in
    llama.cpp, and rename the shards to their final names only then."""
    from ..journal import sha256_file

    quant, single = step.param("quant"), inputs["artifact"].path
    stage = ctx.path(f"{WORK}/split-{quant}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    prefix = stage / single.name.removesuffix(".gguf")
    ctx.run_tool([_tools().tool("llama-gguf-split"), "--split", "--split-max-size", step.param("max_size"), single,
                  prefix], what=f"llama-gguf-split of {quant}")
    shards = sorted(stage.glob(f"{prefix.name}-*-of-*.gguf"))
    if not shards or [s.name for s in shards] != [split_name(single.name, i + 1, len(shards)) for i in range(len(shards))]:
        raise ValidationFailedError(f"llama-gguf-split wrote {[s.name for s in shards]}, not a numbered set of shards")
    result = _load_and_generate(shards[0], f"the first of {len(shards)} {quant} shards", ctx)
    finals = [ctx.path(s.name) for s in shards]
    for final in finals:
        ctx.check_final(final)
    listed = [{"path": f.name, "bytes": s.stat().st_size, "sha256": sha256_file(s)} for s, f in zip(shards, finals, strict=True)]
    facts = {"validated": True, "shards": listed}
    return StepOutcome((), facts, result.peak_rss_bytes, renames=tuple(zip(shards, finals, strict=True)))


# The pinned llama-perplexity sometimes exits 0 without printing its last lines (the summary),
# to a pipe, a pty or its --log-file alike: 1 in 12 runs on an idle 2-core VM, more than half
# under load. The measurement is deterministic, so a run without its result is repeated.
PERPLEXITY_ATTEMPTS = 6


def _perplexity_argv(model: Path, step: Step, ctx: StepContext) -> list[str | os.PathLike[str]]:
    tools = _tools()
    return [tools.tool("llama-perplexity"), "-m", model, "-c", str(step.param("ctx")), "--chunks",
            str(step.param("chunks")), "-t", str(ctx.threads), "-b", str(step.param("ctx")), *_offload(tools)]


def _eval_base(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from ..progress import ChunkProgress
    from ..quality import parse_base_ppl

    if "text" not in dict(step.files):
        raise UsageError("measuring quality needs evaluation text", hint="Pass --eval-text FILE, or --no-eval.")
    out = ctx.path(step.outputs[0])
    tmp = _partial(out)
    tmp.unlink(missing_ok=True)
    argv = [*_perplexity_argv(inputs["model"].path, step, ctx), "-f", step.file("text"),
            "--kl-divergence-base", tmp]
    for attempt in range(1, PERPLEXITY_ATTEMPTS + 1):
        result = ctx.run_tool(argv, what="llama-perplexity (16-bit reference)", parser=ChunkProgress())
        text = result.tail
        if any("you need at least" in line for line in text):
            raise UsageError(f"the evaluation text {step.file('text')} is too short for two chunks of "
                             f"{step.param('ctx')} tokens", hint="Pass a longer --eval-text, a smaller --eval-ctx, or --no-eval.")
        try:
            ppl = parse_base_ppl(text)
            break
        except ValueError as exc:
            if attempt == PERPLEXITY_ATTEMPTS:
                raise ValidationFailedError(f"the 16-bit reference measurement printed no result: {exc}",
                                            hint=f"See {result.log_path}.") from exc
            ctx.warning(f"llama-perplexity ended without its result (attempt {attempt}); measuring again")
    os.replace(tmp, out)
    # the text may hold fewer chunks than asked for: llama-perplexity then takes them all
    found = [int(m[1]) for m in (re.search(r"over (\d+) chunks", line) for line in text) if m]
    chunks = found[-1] if found else step.param("chunks")
    return StepOutcome((out,), {"ppl_base": ppl, "ctx": step.param("ctx"), "chunks": chunks}, result.peak_rss_bytes)


def _eval(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from ..quality import parse_kld_summary

    quant = step.param("quant")
    argv = [*_perplexity_argv(inputs["artifact"].path, step, ctx), "--kl-divergence-base", inputs["base"].path,
            "--kl-divergence"]
    for attempt in range(1, PERPLEXITY_ATTEMPTS + 1):
        result = ctx.run_tool(argv, what=f"llama-perplexity {quant}")
        try:
            figures = parse_kld_summary(result.tail)
            break
        except ValueError as exc:
            if attempt == PERPLEXITY_ATTEMPTS:
                raise ValidationFailedError(f"measuring {quant}: {exc}", hint=f"See {result.log_path}.") from exc
            ctx.warning(f"llama-perplexity ended without its summary (attempt {attempt}); measuring again")
    chunks = int(inputs["base"].facts.get("chunks") or step.param("chunks"))
    scored = chunks * (step.param("ctx") - 1 - step.param("ctx") // 2)
    quality = {**figures, "tokens": scored, "ctx": step.param("ctx"), "runtime": "llama.cpp", "weights": None}
    return StepOutcome((), {"quality": quality}, result.peak_rss_bytes)


def _weights(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """The weights view: the artifact dequantized (transformers' GGUF loader) into the source's
    model class, scored in transformers on the same token ids as every other row. A type or
    architecture that loader cannot read is reported as such, not as a failure of the run."""
    from ..errors import BackendUnavailableError, ToolchainMissingError
    from ..workers import protocol as p

    quant = step.param("quant")
    tokens = str(inputs["tokens"].path)
    job = p.ValidateJob(model=step.file("model"), quantized=str(inputs["artifact"].path),
                        text=p.TextSource(path=tokens), device="auto", eval_source=tokens,
                        eval_source_kind="llama-kld", eval_ctx=step.param("ctx"), eval_chunks=step.param("chunks"),
                        reference_cache=str(ctx.path(hfquant.REFERENCE_DIR) / "reference.safetensors"))
    try:
        events, peak = hfquant.run_worker(ctx, job, p.VALIDATE_BACKEND, f"measuring {quant}'s weights in transformers")
    except (UnsupportedModelError, ToolchainMissingError, BackendUnavailableError) as exc:
        ctx.warning(f"{quant}'s weights not measured in transformers: {exc.message}")
        return StepOutcome((), {"weights": {"unavailable": exc.message}})
    assert events.result is not None
    return StepOutcome((), {"weights": events.result.get("metadata", {}).get("eval")}, peak)


# -- rows ------------------------------------------------------------------------------


def plan_artifact(step: Step, plan: Plan) -> dict[str, Any]:
    quant = step.param("quant")
    return {"format": NAME, "quant": quant, "name": Path(step.outputs[0]).name,
            "expected_bytes": step.estimate.output_bytes, "bits_per_weight": QUANT_TYPES[quant].bpw}


def result_fields(own: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]],
                  readers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    # a split set's step reads the measurements and the quantization as inputs; a single file's are its readers
    quality = readers.get("gguf.eval", inputs.get("quality", {})).get("quality")
    if quality is not None:  # the weights view, scored in transformers (or why it is missing)
        weights = readers.get("gguf.weights", inputs.get("weights", {})).get("weights",
                                                                           {"unavailable": WEIGHTS_UNAVAILABLE})
        quality = {**quality, "weights": weights}
    fields = {"bits_per_weight": inputs.get("quantized", inputs.get("artifact", {})).get("bits_per_weight"),
              "quality": quality, "calibration": None}
    if own.get("shards"):  # a split set: its total size; each shard's size and hash are listed
        fields |= {"shards": own["shards"], "bytes": sum(s["bytes"] for s in own["shards"]), "sha256": None}
    return fields


LIBRARY = "gguf"


def publishable(path: Path) -> str | None:
    return None if path.is_file() else f"{path.name} is missing"


def card_usage(paths: list[str], *, chat: bool) -> str:
    name = paths[0]
    if chat:  # the source's chat template is in every file (tokenizer.chat_template): --jinja applies it
        return (f"llama.cpp (the chat template is in the file, `--jinja` applies it):\n\n```sh\n"
                f"llama-cli -m {name} --jinja -cnv\nllama-server -m {name} --jinja\n```")
    return f"llama.cpp:\n\n```sh\nllama-cli -m {name} -p \"Hello\"\nllama-server -m {name}\n```"


def listing() -> Listing:
    rows = tuple((q.name, f"{q.bpw:.2f}", "yes" if q.needs_imatrix else "", q.note) for q in QUANT_TYPES.values())
    return Listing(("type (--quant, case-insensitive)", "bits/weight", "needs --imatrix", "notes"), rows,
                   "Aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()))
