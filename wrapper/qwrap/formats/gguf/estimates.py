"""GGUF's cost model: the one estimator of every GGUF step kind (used by `plan`, run's disk
check and its disk-full messages), from the model's shape and the step's params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...evaltext import torch_seconds
from ...model import Shape
from ...plan import Estimate
from ...toolchain import gpu_present
from .quants import QUANT_TYPES

MiB = 1 << 20
K_QUANT_OUTPUT_BPW = 6.5625  # output.weight of K-quant mixes is Q6_K


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
    if kind == "gguf.weights":
        return weights_estimate(shape, params)
    if kind == "gguf.sensitivity":
        return _sensitivity_estimate(params, shape)
    if kind == "gguf.coverage":  # reads the importance matrix's counts
        return Estimate(0, TOOL_BASE_RAM, 0, 0.1)
    if kind in ("gguf.mmproj", "gguf.mmproj-validate"):
        return _mmproj_estimate(kind, params, shape)
    quant = params["quant"]
    size = gguf_bytes(shape, quant)
    if kind == "gguf.search":  # a dozen dry runs and a small recipe file
        return Estimate(4096, TOOL_BASE_RAM + shape.largest_tensor * 4, 4096, 1.0)
    if kind == "gguf.compare":  # a stock quantization and its measurement
        q = estimate("gguf.quantize", params, shape)
        e = _eval_estimate(params, shape, base=False, model_bytes=size)
        return Estimate(size, max(q.peak_ram_bytes, e.peak_ram_bytes), size,
                        (q.seconds or 0.0) + (e.seconds or 0.0) if q.seconds is not None else None)
    if kind == "gguf.choose":  # a hard link to the file that ships
        return Estimate(size, TOOL_BASE_RAM, 0, 0.1)
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


MMPROJ_BPW = {"f16": 16.0, "q8_0": 8.5}
MTMD_IMAGE_RAM = 256 * MiB  # llama-mtmd-cli's image encoder buffers on the validation image


def mmproj_bytes(params: Mapping[str, Any]) -> int:
    return int(int(params.get("vision_parameters") or 0) * MMPROJ_BPW.get(params.get("mmproj_type", "f16"), 16.0) / 8) \
        + 64 * 1024


def _mmproj_estimate(kind: str, params: Mapping[str, Any], shape: Shape) -> Estimate:
    """The projector: the converter reads only the vision tower's tensors; its validation loads
    one text file and the projector in llama-mtmd-cli and encodes one small image."""
    size = mmproj_bytes(params)
    vision = int(params.get("vision_parameters") or 0)
    if kind == "gguf.mmproj":
        return Estimate(size, CONVERT_BASE_RAM + 8 * min(shape.largest_tensor, vision or shape.largest_tensor), size,
                        CONVERT_STARTUP_S + vision * 2 / CONVERT_BYTES_PER_S)
    text = str(params.get("text"))
    model = gguf_bytes(shape, text) if text in QUANT_TYPES else intermediate_bytes(shape, "f16")
    return Estimate(size, LOADER_BASE_RAM + MTMD_IMAGE_RAM + model + size, 0,
                    2 * VALIDATE_STARTUP_S + (model + size) / VALIDATE_BYTES_PER_S)


# What a model of the usual layout has: 7 per-layer kinds (attention q, k, v, output; ffn gate,
# up, down) in bands, the token embedding and the output matrix. MoE models have more kinds.
SENSITIVITY_GROUPS = 7 * 3 + 2


def _sensitivity_estimate(params: Mapping[str, Any], shape: Shape) -> Estimate:
    """Per probe: a Q8_0 quantization with overrides and a measurement on the calibration chunks."""
    from .search import probe_count

    probes = probe_count(SENSITIVITY_GROUPS)
    ctx, chunks = int(params["ctx"]), int(params["chunks"])
    q8 = gguf_bytes(shape, "Q8_0")
    per = QUANTIZE_S_PER_100M["Q8_0"] * 3 * shape.parameters / 1e8 + \
        EVAL_S_PER_GTOKEN_PARAM * ctx * chunks * shape.parameters / 1e9 + VALIDATE_STARTUP_S
    base = kld_base_bytes(shape, ctx, chunks)
    ram = TOOL_BASE_RAM + intermediate_bytes(shape, params.get("outtype") or "f16") + 8 * ctx * max(shape.vocab, 1)
    return Estimate(4096, ram, base + q8, probes * per)


def weights_estimate(shape: Shape, params: Mapping[str, Any] | None = None) -> Estimate:
    """The weights view: the source and the dequantized artifact in float32, one after the
    other, plus activations (the time only with the evaluation's ``ctx`` and ``chunks``)."""
    seconds = None
    if params is not None:
        forward = torch_seconds(shape.parameters, int(params["ctx"]) * int(params["chunks"]), gpu=gpu_present())
        seconds = WEIGHTS_STARTUP_S + shape.parameters / DEQUANT_PARAMS_PER_S + 2 * forward
    return Estimate(0, shape.parameters * 4 + 1024 * MiB, 0, seconds)


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
