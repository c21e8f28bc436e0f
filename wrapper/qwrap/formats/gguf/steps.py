"""GGUF's steps for a request: ``gguf.convert`` -> [``gguf.imatrix``] -> ``gguf.quantize:<T>`` ->
``gguf.validate:<T>`` [-> ``gguf.split:<T>`` when the file is planned over --split-max-size],
and with the evaluation ``gguf.eval-base``, ``gguf.eval:<T>`` [and ``gguf.weights:<T>``]; for a
vision model ``gguf.mmproj`` -> ``gguf.mmproj-validate`` (with the first validated text file). Each
step is a complete value: its params are everything that determines its outputs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from ...coverage import moe_experts
from ...errors import UsageError
from ...journal import sha256_file
from ...model import ModelInfo, Shape
from ...modelfiles import read_header
from ...plan import PlanBuilder, Step
from ...toolchain import gpu_present
from ...worker_client import EXCLUSIVE, REFERENCE_DIR
from .budgets import Target, base_quant, human_size
from .declaration import NAME, NO_IMATRIX, WORK, Options, default_imatrix_types, split_bytes
from .estimates import estimate, weights_estimate
from .ggmltypes import GGML_TYPES
from .quants import IMATRIX_IGNORED, OUTTYPE_NAMES, normalize_quant
from .recipes import recipe_name
from .search import CANDIDATES, MAX_BANDS, PROBE, SENSITIVITY_CHUNKS, SENSITIVITY_CTX

IMATRIX_CHUNKS = 128
# Its base file holds llama.cpp's token ids of the evaluation chunks: other runtimes score those.
EVAL_TOKENS = "eval-tokens:llama-kld"


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


def weights_view(o: Options, shape: Shape) -> bool:
    """Whether the plan measures the weights view: asked for (or a GPU makes it cheap) and the
    dequantized copy fits in memory."""
    wanted = o.eval_weights == "on" or (o.eval_weights == "auto" and gpu_present())
    return wanted and weights_estimate(shape).peak_ram_bytes <= psutil.virtual_memory().total * 0.8


def mmproj_name(model_name: str, mmproj_type: str) -> str:
    """The projector file, as llama.cpp's converter names it: mmproj-<model>-<TYPE>.gguf."""
    return f"mmproj-{model_name}-{OUTTYPE_NAMES.get(mmproj_type, mmproj_type.upper())}.gguf"


# Tensor names of a vision tower and its projector in the checkpoints the converter reads
# (Qwen2-VL's visual.*, LLaVA's vision_tower.* and multi_modal_projector.*, Idefics3's vision_model.*...)
_VISION_TENSOR = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision_encoder|vision_embed_tokens|"
                            r"multi_modal_projector|mm_projector|connector|vision)\.")


def vision_parameters(model: ModelInfo) -> int:
    """The vision tower's and projector's parameters, from the safetensors headers (the
    projector file's size estimate)."""
    total = 0
    for path in sorted(model.source.path.glob("*.safetensors")):
        try:
            header = read_header(path)
        except (OSError, ValueError):
            continue
        total += sum(t.elements for n, t in header.tensors.items() if _VISION_TENSOR.search(n))
    return total


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    validated = _add_text_steps(b, o, model)
    if o.mmproj and model.vision_tower and validated:
        _add_projector(b, o, model, validated[0])


def _add_projector(b: PlanBuilder, o: Options, model: ModelInfo, text: Step) -> None:
    """A vision model: its projector converted (``--mmproj``) into ``<final>.partial``, then
    loaded beside one validated text file in llama-mtmd-cli on an image, and renamed only then.
    The validation is a deliverable that provides the run's ``projector``."""
    final = mmproj_name(model.source.name, o.mmproj_type)
    params: dict[str, Any] = {"mmproj_type": o.mmproj_type, "vision_parameters": vision_parameters(model)}
    made = b.add("gguf.mmproj", "gguf.mmproj", NAME, f"convert the vision projector to {o.mmproj_type.upper()}",
                 outputs=(final + ".partial",), params=params, files={"model": str(model.source.path)},
                 estimate=estimate("gguf.mmproj", params, model.shape))
    params = {**params, "text": text.param("quant")}
    b.add("gguf.mmproj-validate", "gguf.mmproj-validate", NAME,
          f"validate the projector with {text.param('quant')} in llama-mtmd-cli",
          inputs={"projector": made.id, "model": text.id}, outputs=(final,), params=params,
          estimate=estimate("gguf.mmproj-validate", params, model.shape), deliverable=True, provides=("projector",))


def _add_text_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> list[Step]:
    """The text model's steps; returns its validate steps (the files a projector can be loaded with)."""
    validated: list[Step] = []
    shape, name = model.shape, model.source.name
    outtype = source_outtype(o, shape, model.config)
    intermediate = f"{WORK}/{name}-{OUTTYPE_NAMES[outtype]}.gguf"
    model_file = {"model": str(model.source.path)}
    params: dict[str, Any] = {"outtype": outtype}
    convert = b.add("gguf.convert", "gguf.convert", NAME, f"convert to {OUTTYPE_NAMES[outtype]} GGUF",
                    outputs=(intermediate,), params=params, files=model_file,
                    estimate=estimate("gguf.convert", params, shape))
    imatrix: Step | None = None
    default_types = default_imatrix_types(o) if model.calibration is not None else []
    if o.imatrix == "auto" or default_types or o.targets:
        calib = model.calibration
        params = {"calib": calib.identity if calib else None, "chunks": IMATRIX_CHUNKS, "outtype": outtype}
        imatrix = b.add("gguf.imatrix", "gguf.imatrix", NAME, "compute importance matrix",
                        inputs={"model": convert.id}, outputs=(f"{WORK}/imatrix.gguf",), params=params,
                        files={"calib": calib.path} if calib and calib.path else {},
                        estimate=estimate("gguf.imatrix", params, shape), threaded=True)
    coverage = _add_coverage(b, o, model, imatrix) if imatrix is not None else None
    base: Step | None = None
    user_imatrix = o.imatrix if o.imatrix not in (None, "auto", NO_IMATRIX) else None
    user_sha = sha256_file(Path(user_imatrix)) if user_imatrix else None
    for quant in dict.fromkeys(normalize_quant(q) for q in o.quants):
        final = artifact_name(name, quant)
        inputs = {"model": convert.id}
        files: dict[str, str] = {}
        params = {"quant": quant, "outtype": outtype}
        beside: tuple[str, ...] = ()  # the recipe, written beside the artifact
        if o.recipe is not None:  # the rules are what matter: a comment edit changes nothing
            from .recipes import load

            params["recipe_sha256"] = load(Path(o.recipe)).sha256
            files["recipe"] = o.recipe
            beside = (recipe_name(final),)
        if (o.imatrix not in (None, NO_IMATRIX) and quant not in IMATRIX_IGNORED) or quant in default_types:
            if imatrix is not None:
                inputs["imatrix"] = imatrix.id
                if coverage is not None and o.strict_coverage:  # nothing is quantized before it passes
                    inputs["coverage"] = coverage.id
            else:
                files["imatrix"] = str(user_imatrix)
            params["imatrix_sha256"] = user_sha
        q = b.add(f"gguf.quantize:{quant}", "gguf.quantize", NAME, f"quantize {quant}",
                  inputs=inputs, outputs=(final + ".partial", *(r + ".partial" for r in beside)), params=params, files=files,
                  estimate=estimate("gguf.quantize", params, shape), threaded=True)
        params = {"quant": quant, "outtype": outtype}
        shards = -(-q.estimate.output_bytes // split_bytes(o.split_max_size))  # planned from the estimate
        v = b.add(f"gguf.validate:{quant}", "gguf.validate", NAME, f"validate {quant}",
                  inputs={"artifact": q.id, "source": convert.id},
                  outputs=(f"{WORK}/{final}" if shards > 1 else final, *beside), params=params,
                  estimate=estimate("gguf.validate", params, shape), deliverable=shards == 1)
        validated.append(v)
        readers: dict[str, str] = {}
        if model.evaluation is not None:
            base = base or _add_eval_base(b, convert, model, outtype)
            params = {"quant": quant, "outtype": outtype, "ctx": model.evaluation.ctx,
                      "chunks": model.evaluation.chunks}
            readers["quality"] = b.add(f"gguf.eval:{quant}", "gguf.eval", NAME, f"measure {quant}",
                                       inputs={"artifact": v.id, "base": base.id}, params=params,
                                       estimate=estimate("gguf.eval", params, shape), threaded=True).id
            if weights_view(o, shape):
                readers["weights"] = b.add(
                    f"gguf.weights:{quant}", "gguf.weights", NAME, f"measure {quant}'s weights in transformers",
                    inputs={"artifact": v.id, "tokens": base.id}, params=params, files=model_file,
                    estimate=estimate("gguf.weights", params, shape), exclusive=EXCLUSIVE,
                    scratch=(REFERENCE_DIR,)).id
        _maybe_split(b, o, shape, quant, final, shards, {"artifact": v.id, "quantized": q.id, **readers})
    if o.targets:
        if imatrix is None or model.evaluation is None:
            raise UsageError("a --target-* budget needs calibration text (its sensitivity) and the evaluation (its "
                             "proof)", hint="Drop --no-eval, and pass --calib FILE where WikiText-2 is out of reach.")
        base = base or _add_eval_base(b, convert, model, outtype)
        validated += _add_budgets(b, o, model, convert, imatrix, base, outtype)
    return validated


def _add_coverage(b: PlanBuilder, o: Options, model: ModelInfo, imatrix: Step) -> Step | None:
    """On a mixture of experts: how many calibration tokens each expert got (from the importance
    matrix), reported; below --min-expert-tokens a warning, or with --strict-coverage a failure
    before any quantization."""
    if not moe_experts(model.config):
        return None
    params = {"min_expert_tokens": o.min_expert_tokens, "strict": o.strict_coverage}
    return b.add("gguf.coverage", "gguf.coverage", NAME, "count each expert's calibration tokens",
                 inputs={"imatrix": imatrix.id}, params=params, estimate=estimate("gguf.coverage", params, model.shape))


def _maybe_split(b: PlanBuilder, o: Options, shape: Shape, quant: str, final: str, shards: int,
                 inputs: dict[str, str]) -> None:
    if shards > 1:  # after the measurements, which read the single file
        params = {"quant": quant, "max_size": o.split_max_size}
        b.add(f"gguf.split:{quant}", "gguf.split", NAME, f"split {quant} into {o.split_max_size} shards",
              inputs=inputs,
              outputs=(split_name(final, 1, shards),), params=params, scratch=(f"{WORK}/split-{quant}",),
              estimate=estimate("gguf.split", params, shape), deliverable=True)


def _add_budgets(b: PlanBuilder, o: Options, model: ModelInfo, convert: Step, imatrix: Step, base: Step,
                 outtype: str) -> list[Step]:
    """Per budget: search a recipe (from the sensitivity measured once), quantize and measure
    it, quantize and measure the stock type nearest its size, choose the one that ships, and
    validate it under the budget's name."""
    shape, name, ev = model.shape, model.source.name, model.evaluation
    assert ev is not None and model.calibration is not None
    calib = model.calibration
    params: dict[str, Any] = {"calib": calib.identity, "outtype": outtype, "ctx": SENSITIVITY_CTX,
                              "chunks": SENSITIVITY_CHUNKS, "bands": MAX_BANDS,
                              "candidates": list(CANDIDATES), "probe": PROBE}
    sens = b.add("gguf.sensitivity", "gguf.sensitivity", NAME, "measure each tensor group's sensitivity",
                 inputs={"model": convert.id, "imatrix": imatrix.id}, outputs=(f"{WORK}/sensitivity.json",),
                 params=params, files={"calib": calib.path} if calib.path else {},
                 estimate=estimate("gguf.sensitivity", params, shape), threaded=True)
    eval_params = {"ctx": ev.ctx, "chunks": ev.chunks, "outtype": outtype}
    # the smallest file a search can make: every tensor at the smallest candidate type
    smallest = int(shape.parameters * GGML_TYPES[CANDIDATES[0].lower()].bpw / 8) if shape.parameters else 0
    validated: list[Step] = []
    for target in (Target.from_key(k) for k in o.targets):
        label, quant = target.label, base_quant(target, shape.parameters)
        budget = target.budget_bytes(shape.parameters)
        if budget is not None and budget < smallest:
            raise UsageError(f"{target.shown}: the smallest file a search can make of this model is about "
                             f"{human_size(smallest)} bytes (every tensor at {CANDIDATES[0]})",
                             hint="Raise the budget, or ask for a stock type with -q.")
        final = artifact_name(name, label)
        params = {"target": target.key, "quant": quant, "outtype": outtype, "candidates": list(CANDIDATES)}
        found = b.add(f"gguf.search:{label}", "gguf.search", NAME, f"search a recipe for {target.shown}",
                      inputs={"model": convert.id, "imatrix": imatrix.id, "sensitivity": sens.id},
                      outputs=(f"{WORK}/{final.removesuffix('.gguf')}.recipe",), params=params,
                      estimate=estimate("gguf.search", params, shape))
        params = {"quant": quant, "outtype": outtype, "target": target.key}
        q = b.add(f"gguf.quantize:{label}", "gguf.quantize", NAME, f"quantize the searched recipe for {target.shown}",
                  inputs={"model": convert.id, "imatrix": imatrix.id, "recipe": found.id},
                  outputs=(f"{WORK}/{final.removesuffix('.gguf')}.searched.gguf",), params=params,
                  estimate=estimate("gguf.quantize", params, shape), threaded=True)
        params = {"quant": quant, "target": target.key, **eval_params}
        measured = b.add(f"gguf.eval:{label}", "gguf.eval", NAME, f"measure the searched {label}",
                         inputs={"artifact": q.id, "base": base.id}, params=params,
                         estimate=estimate("gguf.eval", params, shape), threaded=True)
        choose_inputs = {"search": found.id, "searched": q.id, "measured": measured.id}
        if o.compare:
            params = {"target": target.key, "quant": quant, **eval_params}
            stock = b.add(f"gguf.compare:{label}", "gguf.compare", NAME,
                          f"quantize and measure the stock type nearest {target.shown}",
                          inputs={"model": convert.id, "imatrix": imatrix.id, "search": found.id, "base": base.id},
                          outputs=(f"{WORK}/{final.removesuffix('.gguf')}.stock.gguf",), params=params,
                          estimate=estimate("gguf.compare", params, shape), threaded=True)
            choose_inputs["stock"] = stock.id
        params = {"target": target.key, "quant": quant}
        chosen = b.add(f"gguf.choose:{label}", "gguf.choose", NAME, f"ship the better file for {target.shown}",
                       inputs=choose_inputs, outputs=(final + ".partial", recipe_name(final) + ".partial"),
                       params=params,
                       estimate=estimate("gguf.choose", params, shape))
        params = {"quant": label, "target": target.key, "outtype": outtype}
        shards = -(-chosen.estimate.output_bytes // split_bytes(o.split_max_size))
        v = b.add(f"gguf.validate:{label}", "gguf.validate", NAME, f"validate {label}",
                  inputs={"artifact": chosen.id, "source": convert.id},
                  outputs=(f"{WORK}/{final}" if shards > 1 else final, recipe_name(final)), params=params,
                  estimate=estimate("gguf.validate", {**params, "quant": quant}, shape), deliverable=shards == 1)
        validated.append(v)
        _maybe_split(b, o, shape, label, final, shards, {"artifact": v.id, "quantized": chosen.id, "quality": chosen.id})
    return validated


def _add_eval_base(b: PlanBuilder, convert: Step, model: ModelInfo, outtype: str) -> Step:
    """The 16-bit model's next-token distributions on the evaluation chunks, once per run: every
    artifact's KL divergence is measured against this file (and it holds the token ids)."""
    ev = model.evaluation
    assert ev is not None
    params = {"text": ev.identity, "ctx": ev.ctx, "chunks": ev.chunks, "outtype": outtype}
    return b.add("gguf.eval-base", "gguf.eval-base", NAME, "measure the 16-bit model",
                 inputs={"model": convert.id}, outputs=(f"{WORK}/eval-base.kld",), params=params,
                 files={"text": ev.path} if ev.path else {}, estimate=estimate("gguf.eval-base", params, shape=model.shape),
                 threaded=True, provides=(EVAL_TOKENS,))
