"""GGUF: convert once to 16-bit with the pinned converter, optionally compute an importance
matrix, quantize each requested type with llama-quantize, validate each artifact.

Steps (ids): ``gguf.convert`` -> [``gguf.imatrix``] -> ``gguf.quantize:<T>`` ->
``gguf.validate:<T>``. The 16-bit intermediate lives in ``.checkpoint/work/``; each
quantized file is written as ``<final>.partial`` and renamed by its validate step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import envs
from ..context import RunContext, StepOutcome, run_tool
from ..errors import UsageError, ValidationFailedError
from ..ggufinfo import GGUFFormatError, read_info
from ..hub import ModelSource, parameter_counts, safetensors_header
from ..journal import sha256_file
from ..plan import Step, StepBuilder
from ..progress import ChunkProgress, ConvertProgress, QuantizeProgress
from ..request import Request
from ..toolchain import find_toolchain

NAME = "gguf"
IMATRIX_CHUNKS = 128
VALIDATE_PROMPT = "Once upon a time"


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
OUTTYPE_NAMES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


def normalize_quant(name: str) -> str:
    key = name.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise UsageError(
            f"unknown GGUF quant type {name!r}",
            hint="Valid types (case-insensitive): " + ", ".join(QUANT_TYPES) + ". See `qwrap formats`.",
        )
    return key


def uses_imatrix(quant: str, request: Request) -> bool:
    return request.imatrix is not None and quant not in IMATRIX_IGNORED


def validate_options(request: Request) -> None:
    """Everything that can be checked before any work."""
    quants = [normalize_quant(q) for q in request.quants]
    if not quants:
        raise UsageError("no GGUF quant type given", hint="Pass --quant Q4_K_M (repeatable).")
    needing = [q for q in quants if QUANT_TYPES[q].needs_imatrix]
    if needing and request.imatrix is None:
        raise UsageError(
            f"{', '.join(needing)} need(s) an importance matrix",
            hint="Add `--imatrix auto --calib FILE.txt` (computed once with llama-imatrix), "
            "or `--imatrix FILE` for a precomputed one.",
        )
    if request.imatrix not in (None, "auto") and not Path(request.imatrix).is_file():
        raise UsageError(f"--imatrix file {request.imatrix} does not exist")
    if request.calib not in (None, "wikitext2") and not Path(request.calib).is_file():
        raise UsageError(f"--calib file {request.calib} does not exist")


def source_outtype(source: ModelSource, request: Request) -> str:
    """bf16 when the source weights are bf16, else f16 (unless --outtype says otherwise)."""
    if request.outtype != "auto":
        return request.outtype
    dtypes = parameter_counts(source)
    if dtypes:
        return "bf16" if max(dtypes, key=lambda d: dtypes[d]) == "BF16" else "f16"
    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError):
        return "f16"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return "bf16" if dtype == "bfloat16" else "f16"


def artifact_name(source: ModelSource, quant: str) -> str:
    return f"{source.name}-{quant}.gguf"


def add_steps(b: StepBuilder, request: Request, source: ModelSource, calib_sha: str | None) -> None:
    outtype = source_outtype(source, request)
    intermediate = f".checkpoint/work/{source.name}-{OUTTYPE_NAMES[outtype]}.gguf"
    convert = b.add(
        "gguf.convert", "gguf.convert", NAME, f"convert to {OUTTYPE_NAMES[outtype]} GGUF",
        outputs=(intermediate,), params={"outtype": outtype},
    )
    imatrix: Step | None = None
    if request.imatrix == "auto":
        imatrix = b.add(
            "gguf.imatrix", "gguf.imatrix", NAME, "compute importance matrix",
            inputs=(convert.id,), outputs=(".checkpoint/work/imatrix.gguf",),
            params={"calib_sha256": calib_sha, "chunks": IMATRIX_CHUNKS},
        )
    user_imatrix = None
    if request.imatrix not in (None, "auto"):
        user_imatrix = sha256_file(Path(request.imatrix))
    for quant in dict.fromkeys(normalize_quant(q) for q in request.quants):
        final = artifact_name(source, quant)
        inputs: tuple[str, ...] = (convert.id,)
        params: dict[str, object] = {"quant": quant}
        if uses_imatrix(quant, request):
            if imatrix is not None:
                inputs += (imatrix.id,)
            params["imatrix_sha256"] = user_imatrix
        q = b.add(
            f"gguf.quantize:{quant}", "gguf.quantize", NAME, f"quantize {quant}",
            inputs=inputs, outputs=(final + ".partial",), params=params,
        )
        b.add(
            f"gguf.validate:{quant}", "gguf.validate", NAME, f"validate {quant}",
            inputs=(q.id, convert.id), outputs=(final,), params={"quant": quant}, deliverable=True,
        )


def estimate_bytes(step: Step, parameters: int) -> int:
    """Disk a step's outputs will take (for the preflight check and disk-full messages)."""
    if step.kind == "gguf.convert":
        return parameters * (4 if step.param("outtype") == "f32" else 2)
    if step.kind == "gguf.quantize":
        return int(parameters * QUANT_TYPES[step.param("quant")].bpw / 8 * 1.05) + (1 << 20)
    if step.kind == "gguf.imatrix":
        return parameters // 50 + (1 << 20)
    return 0


# -- actions -------------------------------------------------------------------------


def execute(step: Step, ctx: RunContext) -> StepOutcome:
    actions = {
        "gguf.convert": _convert,
        "gguf.imatrix": _imatrix,
        "gguf.quantize": _quantize,
        "gguf.validate": _validate,
    }
    return actions[step.kind](step, ctx)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _convert(step: Step, ctx: RunContext) -> StepOutcome:
    tools = find_toolchain()
    out = ctx.output / step.outputs[0]
    tmp = _partial(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    python = envs.find_env("convert").python
    n_tensors = sum(len(safetensors_header(p)) for p in sorted(ctx.source.path.glob("*.safetensors")))
    argv: list[str | os.PathLike[str]] = [
        python, tools.converter, ctx.source.path,
        "--outfile", tmp, "--outtype", step.param("outtype"),
    ]
    result = run_tool(
        ctx, step.id, argv, what="convert_hf_to_gguf.py",
        parser=ConvertProgress(n_tensors or None), env={"PYTHONUNBUFFERED": "1"},
        oom_extra="--no-lazy is off by default; close other jobs",
    )
    info = _read_header(tmp, "the converter's output")
    os.replace(tmp, out)
    facts = {
        "architecture": info.architecture,
        "tensor_count": len(info.tensors),
        "parameter_count": info.parameter_count,
        "file_type": info.file_type,
    }
    return StepOutcome([out], facts, result.peak_rss_bytes)


def _imatrix(step: Step, ctx: RunContext) -> StepOutcome:
    tools = find_toolchain()
    model = ctx.output / ctx.plan_outputs(step.inputs[0])[0]
    out = ctx.output / step.outputs[0]
    tmp = out.with_name("imatrix.partial.gguf")  # llama-imatrix picks its format from the suffix
    tmp.unlink(missing_ok=True)
    calib = ctx.calib_text()
    argv: list[str | os.PathLike[str]] = [
        tools.tool("llama-imatrix"), "-m", model, "-f", calib, "-o", tmp,
        "-t", str(ctx.threads), "-c", "512", "--chunks", str(step.param("chunks")),
        "--log-jsonl",
    ]
    result = run_tool(ctx, step.id, argv, what="llama-imatrix", parser=ChunkProgress())
    if not tmp.is_file():
        raise ValidationFailedError(f"llama-imatrix exited 0 but wrote no {tmp}")
    os.replace(tmp, out)
    return StepOutcome([out], {}, result.peak_rss_bytes)


def _quantize(step: Step, ctx: RunContext) -> StepOutcome:
    tools = find_toolchain()
    source = ctx.output / ctx.plan_outputs("gguf.convert")[0]
    out = ctx.output / step.outputs[0]
    out.unlink(missing_ok=True)  # llama-quantize can leave a partial file on failure
    quant = step.param("quant")
    argv: list[str | os.PathLike[str]] = [tools.tool("llama-quantize")]
    if uses_imatrix(quant, ctx.request):
        imatrix = ctx.output / ctx.plan_outputs("gguf.imatrix")[0] if ctx.request.imatrix == "auto" \
            else Path(str(ctx.request.imatrix))
        argv += ["--imatrix", imatrix]
    argv += [source, out, quant, str(ctx.threads)]
    try:
        result = run_tool(ctx, step.id, argv, what=f"llama-quantize {quant}", parser=QuantizeProgress())
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    info = _read_header(out, f"llama-quantize's {quant} output")
    size = out.stat().st_size
    bpw = size * 8 / info.parameter_count if info.parameter_count else 0.0
    return StepOutcome([out], {"bits_per_weight": round(bpw, 3), "bytes": size}, result.peak_rss_bytes)


def _read_header(path: Path, what: str):  # type: ignore[no-untyped-def]
    try:
        return read_info(path)
    except (OSError, GGUFFormatError) as exc:
        raise ValidationFailedError(f"{what} {path} is not a readable GGUF file: {exc}") from exc


def _validate(step: Step, ctx: RunContext) -> StepOutcome:
    """Read the header back, compare with the 16-bit source, load it in llama.cpp and
    generate a few tokens; only then rename the partial file to its final name."""
    quant = step.param("quant")
    partial = ctx.output / ctx.plan_outputs(step.inputs[0])[0]
    final = ctx.output / step.outputs[0]
    source = ctx.facts.get("gguf.convert", {})
    info = _read_header(partial, f"the {quant} artifact")
    expected = QUANT_TYPES[quant].ftype
    problems = []
    if source.get("architecture") and info.architecture != source["architecture"]:
        problems.append(f"architecture {info.architecture!r} != source {source['architecture']!r}")
    if info.file_type != expected:
        problems.append(f"file type {info.file_type} != {expected} ({quant})")
    if source.get("tensor_count") and len(info.tensors) != source["tensor_count"]:
        problems.append(f"{len(info.tensors)} tensors != {source['tensor_count']} in the 16-bit source")
    if problems:
        raise ValidationFailedError(f"{quant} artifact failed header checks: " + "; ".join(problems))
    tools = find_toolchain()
    argv: list[str | os.PathLike[str]] = [
        tools.tool("llama-simple"), "-m", partial, "-n", "8", VALIDATE_PROMPT,
    ]
    result = run_tool(ctx, step.id, argv, what=f"loading {quant} in llama.cpp")
    generated = "\n".join(result.tail)
    if VALIDATE_PROMPT not in generated:
        raise ValidationFailedError(f"llama.cpp loaded {quant} but generated nothing")
    ctx.check_final(final)
    return StepOutcome(
        [],
        {"validated": True, "architecture": info.architecture, "tensor_count": len(info.tensors)},
        result.peak_rss_bytes,
        renames=[(partial, final)],
    )
