"""Before any heavy work: what will run, how big it gets, and whether it can succeed.

Reads only config.json, the tokenizer files and safetensors headers (a Hub model is
resolved without its weights). Estimates per artifact come from parameter counts and
bits per weight, split the way llama.cpp treats tensors: 1-D norms stay F32, the output
matrix of K-quant mixes is Q6_K, everything else takes the type's bits per weight.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InsufficientDiskError, QwrapError, UnsupportedModelError
from .formats.gguf import QUANT_TYPES, normalize_quant, source_outtype
from .hub import ModelSource, parameter_counts
from .request import Request
from .toolchain import supported_architectures
from .units import human_bytes

MiB = 1 << 20
K_QUANT_OUTPUT_BPW = 6.5625  # output.weight of K-quant mixes is Q6_K


@dataclass(frozen=True)
class Shape:
    """What the estimates need from config.json and the headers."""

    parameters: int
    vocab_embed: int  # vocab * hidden (token embedding)
    output: int  # vocab * hidden unless tied
    norms: int  # 1-D weights (kept in F32)
    weight_bytes: int  # the source weights on disk
    vocab: int = 0

    @property
    def metadata_bytes(self) -> int:
        """GGUF header: mostly the vocabulary (token text, score, type)."""
        return self.vocab * 32 + 32 * 1024


@dataclass
class Report:
    model: str
    architecture: str | None
    shape: Shape
    steps: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"name": name, "ok": ok, "detail": detail})

    def to_json(self) -> dict[str, Any]:
        return {"schema": "qwrap.plan/1", "model": self.model, "architecture": self.architecture,
                "parameters": self.shape.parameters, "steps": self.steps, "artifacts": self.artifacts,
                "disk": self.disk, "checks": self.checks}


def read_config(source: ModelSource) -> dict[str, Any]:
    try:
        data = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot read {source.path / 'config.json'}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def model_shape(source: ModelSource, config: dict[str, Any], token: str | None = None) -> Shape:
    counts = parameter_counts(source, token=token)
    total = sum(counts.values())
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size", 0) or 0)
    vocab = int(text.get("vocab_size", 0) or 0)
    layers = int(text.get("num_hidden_layers", 0) or 0)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    bytes_per = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1, "U8": 1}
    weight_bytes = sum(n * bytes_per.get(d, 2) for d, n in counts.items())
    return Shape(total, vocab * hidden, 0 if tied else vocab * hidden, (2 * layers + 1) * hidden, weight_bytes, vocab)


def gguf_bytes(shape: Shape, quant: str) -> int:
    """Expected file size of one GGUF type."""
    bpw = QUANT_TYPES[quant].bpw
    out_bpw = K_QUANT_OUTPUT_BPW if "_K" in quant and bpw < K_QUANT_OUTPUT_BPW else bpw
    matrices = shape.parameters - shape.norms - shape.output
    data = matrices * bpw / 8 + shape.output * out_bpw / 8 + shape.norms * 4
    return int(data) + shape.metadata_bytes


def intermediate_bytes(shape: Shape, outtype: str) -> int:
    norms_f32 = shape.norms * 2  # norms are written as F32 even in a 16-bit file
    return shape.parameters * (4 if outtype == "f32" else 2) + (0 if outtype == "f32" else norms_f32) + shape.metadata_bytes


def _free(path: Path) -> tuple[Path, int]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def gguf_plan(report: Report, request: Request, source: ModelSource) -> int:
    """Steps and artifacts for GGUF; returns the peak disk they need in OUT."""
    outtype = source_outtype(source, request)
    inter = intermediate_bytes(report.shape, outtype)
    report.steps.append({"id": "gguf.convert", "expected_bytes": inter,
                         "expected_peak_ram_bytes": int(report.shape.weight_bytes * 0.3) + 600 * MiB})
    total = inter
    if request.imatrix == "auto":
        report.steps.append({"id": "gguf.imatrix", "expected_bytes": report.shape.parameters // 50,
                             "expected_peak_ram_bytes": inter + 300 * MiB})
        total += report.shape.parameters // 50
    for quant in dict.fromkeys(normalize_quant(q) for q in request.quants):
        size = gguf_bytes(report.shape, quant)
        total += size
        report.steps.append({"id": f"gguf.quantize:{quant}", "expected_bytes": size,
                             "expected_peak_ram_bytes": inter + 200 * MiB})
        report.steps.append({"id": f"gguf.validate:{quant}", "expected_bytes": 0,
                             "expected_peak_ram_bytes": size + 200 * MiB})
        report.artifacts.append({"format": "gguf", "quant": quant, "name": f"{source.name}-{quant}.gguf",
                                 "expected_bytes": size, "bits_per_weight": QUANT_TYPES[quant].bpw})
    return total


def hf_bytes(shape: Shape, bits: int, group: int) -> int:
    """Expected size of an AWQ/GPTQ folder: packed linear weights plus a 16-bit scale and a
    packed zero point per group; embeddings, lm_head and norms stay 16-bit."""
    linear = shape.parameters - shape.vocab_embed - shape.output - shape.norms
    per_group = (2 + bits / 8) / (group if group > 0 else 4096)
    data = linear * (bits / 8 + per_group) + (shape.vocab_embed + shape.output + shape.norms) * 2
    return int(data) + shape.metadata_bytes * 4  # tokenizer files copied along


def hf_plan(report: Report, request: Request, source: ModelSource, fmt: str) -> int:
    o = request.quant_options
    size = hf_bytes(report.shape, o.bits, o.group_size)
    name = f"{source.name}-{fmt.upper()}-{o.bits}bit-g{o.group_size}"
    ram = report.shape.parameters * 4 + 1024 * MiB  # a float32 copy on CPU plus activations
    report.steps.append({"id": f"{fmt}.quantize", "expected_bytes": size, "expected_peak_ram_bytes": ram})
    report.steps.append({"id": f"{fmt}.validate", "expected_bytes": 0, "expected_peak_ram_bytes": ram})
    report.artifacts.append({"format": fmt, "quant": f"{o.bits}bit-g{o.group_size}", "name": name,
                             "expected_bytes": size, "bits_per_weight": size * 8 / max(report.shape.parameters, 1)})
    return size


def _unsupported(arch: str | None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"architecture {arch} is not supported by the pinned llama.cpp converter",
        hint="`qwrap formats --architectures` lists what is; a newer llama.cpp may add it "
        "(QWRAP_LLAMA_CPP_DIR).",
    )


def require_supported_architecture(config: dict[str, Any]) -> None:
    """`run`'s check: refuse an architecture the converter does not register. An unreadable
    registry is not a refusal; the converter itself will say."""
    arch = (config.get("architectures") or [None])[0]
    try:
        supported = supported_architectures()
    except QwrapError:
        return
    if arch not in supported:
        raise _unsupported(arch)


def architecture_check(report: Report, config: dict[str, Any]) -> None:
    """`plan`'s check: the same, recorded in the report."""
    arch = report.architecture = (config.get("architectures") or [None])[0]
    try:
        supported = supported_architectures()
    except QwrapError as exc:
        report.check("architecture", False, f"cannot read the converter's list: {exc.message}")
        return
    ok = arch in supported
    report.check("architecture", ok, f"{arch} is {'' if ok else 'not '}supported by the pinned converter")
    if not ok:
        raise _unsupported(arch)


def tokenizer_check(report: Report, source: ModelSource) -> None:
    """A vocab-only conversion (seconds, no weights needed) catches tokenizers the pinned
    converter rejects, such as unknown BPE pre-tokenizers, before hours of work."""
    from . import envs, supervisor
    from .failures import error_for
    from .toolchain import find_toolchain

    try:
        tools = find_toolchain()
        python = envs.find_env("convert").python
        converter = tools.converter
    except QwrapError as exc:
        report.check("tokenizer", False, f"not checked: {exc.message}")
        return
    with tempfile.TemporaryDirectory(prefix="qwrap-vocab-") as tmp:
        result = supervisor.run([python, converter, source.path, "--vocab-only", "--outfile",
                                 Path(tmp) / "vocab.gguf"], log_path=Path(tmp) / "vocab.log")
        if result.ok:
            report.check("tokenizer", True, "the pinned converter accepts the tokenizer")
        else:
            err = error_for(result, "vocab-only conversion")
            report.check("tokenizer", False, err.message)


def disk_check(report: Report, output: Path, needed: int) -> None:
    where, free = _free(output)
    report.disk = {"path": str(output), "peak_bytes": needed, "free_bytes": free}
    ok = needed <= free
    report.check("disk", ok, f"needs about {human_bytes(needed)} in {where}, {human_bytes(free)} free")
    if not ok:
        raise InsufficientDiskError(
            f"{output} needs about {human_bytes(needed)} but {where} has {human_bytes(free)} free",
            hint="Free space or choose another --output; --no-preflight skips this check.",
        )


def hub_cache_check(report: Report, source: ModelSource) -> None:
    """A Hub model's weights land in the Hugging Face cache, usually on another disk."""
    if source.repo_id is None:
        return
    cache = source.path
    while cache.name and cache.name != "hub":
        cache = cache.parent
    cache = cache if cache.name == "hub" else source.path
    missing = report.shape.weight_bytes if not any(source.path.glob("*.safetensors")) else 0
    where, free = _free(cache)
    report.disk["hub_cache"] = {"path": str(where), "download_bytes": missing, "free_bytes": free}
    ok = missing <= free
    report.check("hub cache", ok, f"weights to download: {human_bytes(missing)}, {human_bytes(free)} free in {where}")
    if not ok:
        raise InsufficientDiskError(
            f"downloading {source.repo_id} needs about {human_bytes(missing)} in {where}, which has "
            f"{human_bytes(free)} free",
            hint="Free space, or point HF_HOME at a bigger disk.",
        )


def run_preflight(request: Request, source: ModelSource, *, token: str | None = None,
                  strict: bool = True) -> Report:
    """The plan for ``request``; raises the first failing check when ``strict``."""
    config = read_config(source)
    report = Report(request.model, None, model_shape(source, config, token))
    needed = 0
    try:
        if "gguf" in request.formats:
            architecture_check(report, config)
            needed += gguf_plan(report, request, source)
        for fmt in ("awq", "gptq"):
            if fmt in request.formats:
                needed += hf_plan(report, request, source, fmt)
        disk_check(report, request.output, needed)
        hub_cache_check(report, source)
    except QwrapError:
        if strict:
            raise
    return report
