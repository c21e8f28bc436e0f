"""What AWQ and GPTQ run alike: a quantize step run by a backend worker in its own
environment, then a validate step that reloads the artifact in a separate worker and measures
its KL divergence against the unquantized model, then renames ``NAME.partial`` to ``NAME``;
their model checks and their estimates.

Loaded by the entry points in hfbase.py (`qwrap --help` reads only that and hfoptions.py of
AWQ and GPTQ); the workers are run by worker_client.py.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checks import Check
from ..context import Inputs, StepContext, StepOutcome
from ..coverage import facts as coverage_facts
from ..coverage import from_module_samples, moe_experts
from ..errors import UnsupportedModelError, UsageError, ValidationFailedError
from ..evaltext import torch_seconds
from ..hub import parameter_counts
from ..journal import sha256_file
from ..model import ModelInfo, Shape
from ..modelfiles import ModelSource, custom_code
from ..plan import Estimate, PlanBuilder, Step
from ..toolchain import cache_root, gpu_present
from ..worker_client import EXCLUSIVE, REFERENCE_DIR, Events, run_worker
from ..workers.backends import VALIDATE_BACKEND
from ..workers.calib import TOKENIZER_FILES
from ..workers.protocol import QuantizeJob, TextSource, ValidateJob
from .hfoptions import Common

MiB = 1 << 20
VALIDATE_SAMPLES = 8
VALIDATE_SEQ_LEN = 128
TOKEN_PROVIDERS = ("eval-tokens:llama-kld",)  # steps whose output holds the evaluation's token ids


def read_widths(config: Mapping[str, Any]) -> list[int]:
    """The layer widths a group size must divide (hidden and intermediate sizes)."""
    text = config.get("text_config", config)
    return [int(text[k]) for k in ("hidden_size", "intermediate_size") if isinstance(text.get(k), int)]


def checks(o: Common, model: ModelInfo, *, thorough: bool) -> list[Check]:
    found = [_custom_code_check(o, model), _support_check(o, model), _group_size_check(o, model),
             _moe_routing_check(o, model)]
    if model.vision_tower:
        found.append(_vision_check(o))
    return found


def _vision_check(o: Common) -> Check:
    """A vision-language model: the backends quantize the language model's layers and keep the
    vision tower unquantized; they load the checkpoint with its processor, whose image and
    video processors need torchvision in the backend's environment."""
    found = _has_torchvision(o.backend)
    if found is None:
        return Check("vision tower", True, f"not checked: the {o.backend} environment is not created yet")
    if found:
        return Check("vision tower", True, f"a vision model: {o.backend} quantizes the language model's layers; the "
                     "vision tower is kept unquantized, as in the source")
    error = UnsupportedModelError(
        f"a vision model: {o.backend} loads it with its processor, whose image and video processors need "
        f"torchvision, and the {o.backend} environment has none; the vision tower would be kept unquantized",
        hint="Use --format gguf: the text model quantized and the vision tower as its projector "
        "(mmproj-<model>-F16.gguf) beside it.")
    return Check("vision tower", False, error.message, error)


def _has_torchvision(backend: str) -> bool | None:
    """Whether the backend's environment holds torchvision; None when it is not created."""
    from ..envs import find_env
    from ..errors import QwrapError

    try:
        return find_env(backend).holds("torchvision")
    except QwrapError:
        return None


def _support_check(o: Common, model: ModelInfo) -> Check:
    """The backend's own model table and, for one that walks layers by its own names
    (autoawq), that walk on a weightless skeleton of this model: before anything is loaded."""
    from ..support import support
    from ..workers.backends import DECLARED_BACKENDS, backends_for

    config_path = model.source.path / "config.json"
    found = support(o.backend, dict(model.config), config_path, o.FORMAT)
    if found is None:
        return Check("backend support", True, f"not checked: the {o.backend} environment is not created yet")
    if found.ok:
        return Check("backend support", True, f"{o.backend} can quantize {found.model_type}"
                     + (f" ({found.reason})" if found.probe_ok is not None and found.reason else ""))
    able = [b for b in backends_for(o.FORMAT) if b != o.backend
            and (other := support(b, dict(model.config), config_path, o.FORMAT)) is not None and other.ok]
    # the other format its backends write (AWQ <-> GPTQ), with the first backend that can
    formats = dict.fromkeys(f for b in DECLARED_BACKENDS for f in b.formats if f != o.FORMAT)
    instead = next((f"--format {f} (--backend {b})" for f in formats for b in backends_for(f)
                    if (other := support(b, dict(model.config), config_path, f)) is not None and other.ok), None)
    elsewhere = f"{instead}, or GGUF (--format gguf)" if instead else "GGUF (--format gguf)"
    hint = (f"Use --backend {able[0]} (it can quantize {found.model_type}); or {elsewhere}." if able
            else f"No {o.FORMAT.upper()} backend here can; {elsewhere} can.")
    can = f" (--backend {able[0]} can)" if able else ""
    error = UnsupportedModelError(f"{o.backend} cannot quantize this {found.model_type} model for "
                                  f"{o.FORMAT.upper()}{can}: {found.reason}", hint=hint)
    return Check("backend support", False, error.message, error)


MOE_ROUTINGS = ("routed", "all")


def _moe_routing_check(o: Common, model: ModelInfo) -> Check:
    """--moe-routing all: GPTQModel's own routing override (every calibration token through
    every expert); other backends route as the model does."""
    if o.moe_routing not in MOE_ROUTINGS:
        error = UsageError(f"--moe-routing {o.moe_routing!r} is not one of {', '.join(MOE_ROUTINGS)}",
                           hint="Use --moe-routing routed (the default) or --moe-routing all.")
        return Check("moe routing", False, error.message, error)
    experts = moe_experts(model.config)
    if o.moe_routing == "routed":
        return Check("moe routing", True, f"calibration routed as the model routes it ({experts} experts)" if experts
                     else "not a mixture of experts")
    if o.backend != "gptqmodel":
        error = UsageError(f"--moe-routing all needs the gptqmodel backend, not {o.backend}",
                           hint="Use --backend gptqmodel, or leave --moe-routing at routed.")
        return Check("moe routing", False, error.message, error)
    if not experts:
        return Check("moe routing", True, "--moe-routing all has no effect: not a mixture of experts")
    return Check("moe routing", True, f"every calibration token goes through each of the {experts} experts of a "
                 "layer (GPTQModel's routing override; slower)")


def _group_size_check(o: Common, model: ModelInfo) -> Check:
    """The group size must divide the input width of every matrix the backend quantizes: read
    from the weights' headers (a low-rank projection of an MLA model is narrower than the
    config's hidden and intermediate sizes), else from the config."""
    from ..hub import layer_inputs

    inputs = layer_inputs(model.source) if o.group_size > 0 else {}
    if not inputs:
        inputs = {w: f"the config's {w}" for w in read_widths(model.config)}
    widths = sorted(inputs)
    bad = [w for w in widths if o.group_size > 0 and w % o.group_size]
    if not bad:
        return Check("group size", True, f"{o.group_size} divides the layer input widths {widths}")
    error = UsageError(f"--group-size {o.group_size} does not divide the input width {bad[0]} of "
                       f"{inputs[bad[0]]}",
                       hint="Choose a group size that divides " + ", ".join(map(str, widths)) + " (e.g. "
                       f"{_largest_divisor(widths)}).")
    return Check("group size", False, error.message, error)


def _largest_divisor(widths: list[int]) -> int:
    """The largest power of two up to 128 that divides every width (the usual group sizes)."""
    for g in (128, 64, 32, 16, 8):
        if all(w % g == 0 for w in widths):
            return g
    return 1


def _custom_code_check(o: Common, model: ModelInfo) -> Check:
    """The backends load the model with transformers: a model that ships its own code needs
    it run, which qwrap does only with --trust-remote-code."""
    found = custom_code(model.source.path, model.config)
    if not found:
        return Check("custom code", True, "none: transformers' own model classes load it")
    listed = "; ".join(found)
    if o.trust_remote_code:
        return Check("custom code", True, f"runs the model's own code (--trust-remote-code): {listed}")
    error = UnsupportedModelError(
        f"{model.source.name} ships its own model code ({listed}), which AWQ/GPTQ would have to run "
        "and qwrap does not run unless asked",
        hint="If you trust that code, pass --trust-remote-code (it runs in the backend workers with your "
        "permissions); GGUF needs no model code (--format gguf).")
    return Check("custom code", False, error.message, error)


# -- steps and estimates ---------------------------------------------------------------


def _on_gpu(device: str) -> bool:
    """Whether the worker will compute on the GPU (then it keeps ~one core busy, not its threads)."""
    return device == "cuda" or (device == "auto" and gpu_present())


def artifact_name(model_name: str, fmt: str, bits: int, group: int) -> str:
    return f"{model_name}-{fmt.upper()}-{bits}bit-g{group}"


def folder_bytes(shape: Shape, bits: int, group: int, copied: int | None = None) -> int:
    """Expected size of an AWQ/GPTQ folder: packed linear weights plus a 16-bit scale and a
    packed zero point per group; embeddings, lm_head and norms stay 16-bit; ``copied``: the
    tokenizer files copied along (guessed from the vocabulary when they are not here yet)."""
    linear = shape.parameters - shape.vocab_embed - shape.output - shape.norms
    per_group = (2 + bits / 8) / (group if group > 0 else 4096)
    data = linear * (bits / 8 + per_group) + (shape.vocab_embed + shape.output + shape.norms) * 2
    return int(data) + (shape.metadata_bytes * 4 if copied is None else copied)


def copied_bytes(model: Path) -> int | None:
    """The size of the source's tokenizer files, which every AWQ/GPTQ folder carries unchanged
    (None when there are none here yet: a Hub model planned before they are fetched)."""
    sizes = [(model / name).stat().st_size for name in TOKENIZER_FILES if (model / name).is_file()]
    return sum(sizes) if sizes else None


def estimate(kind: str, params: Mapping[str, Any], shape: Shape, copied: int | None = None) -> Estimate:
    """The one estimator of both AWQ/GPTQ step kinds."""
    ram = shape.parameters * 4 + 1024 * MiB  # a float32 copy on CPU plus activations
    size = folder_bytes(shape, params["bits"], params["group_size"], copied)
    if kind == "hf.quantize":
        return Estimate(size, ram, 2 * size)  # the folder plus its per-layer checkpoints
    # hf.validate: reloads it, renames it; with the evaluation, the source (once per run, then
    # cached) and the artifact each run a forward pass over the chunks (no cost model otherwise)
    tokens = int(params.get("eval_chunks") or 0) * int(params.get("eval_ctx") or 0)
    if not tokens:
        return Estimate(size, ram, 0)
    return Estimate(size, ram, 0, 2 * torch_seconds(shape.parameters, tokens,
                                                             gpu=_on_gpu(str(params.get("device")))))


def add_steps(b: PlanBuilder, o: Common, model: ModelInfo, *, fmt: str, own: Mapping[str, Any]) -> None:
    """``own``: the format's worker-job fields (e.g. AWQ's zero_point and version)."""
    shape, copied = model.shape, copied_bytes(model.source.path)
    final = artifact_name(model.source.name, fmt, o.bits, o.group_size)
    calib = model.calibration
    files = {"model": str(model.source.path), **({"calib": calib.path} if calib and calib.path else {})}
    params = {"backend": o.backend, "bits": o.bits, "group_size": o.group_size,
              "calib": calib.identity if calib else None, "calib_label": calib.label if calib else None,
              "calib_samples": o.calib_samples, "calib_seq_len": o.calib_seq_len, "seed": o.seed,
              "device": o.device, "trust_remote_code": o.trust_remote_code, "job": dict(own)}
    if moe_experts(model.config):  # a mixture of experts: each expert's calibration samples are checked
        params |= {"experts": moe_experts(model.config), "min_expert_tokens": o.min_expert_tokens,
                   "strict_coverage": o.strict_coverage}
        if o.moe_routing != "routed":  # (absent when routed: the fingerprints of earlier runs stay)
            params["moe_routing"] = o.moe_routing
    # per-layer checkpoints, named by the step's fingerprint so other options never reuse them
    q = b.add(f"{fmt}.quantize", "hf.quantize", fmt, f"{fmt.upper()} quantize ({o.backend})",
              outputs=(final + ".partial",), params=params, files=files,
              estimate=estimate("hf.quantize", params, shape, copied), threaded=not _on_gpu(o.device), exclusive=EXCLUSIVE,
              scratch=(f".checkpoint/layers/{fmt}-{{fingerprint}}",), gpu=o.device != "cpu")
    params = {"samples": VALIDATE_SAMPLES, "seq_len": VALIDATE_SEQ_LEN, "quant": f"{o.bits}bit-g{o.group_size}",
              "bits": o.bits, "group_size": o.group_size,
              "calib_label": params["calib_label"], "seed": o.seed, "device": o.device,
              "trust_remote_code": o.trust_remote_code}
    inputs = {"artifact": q.id}
    ev = model.evaluation
    if ev is not None:  # the run's evaluation chunks: llama.cpp's token ids when GGUF is made too
        tokens = next((b.provider(kind) for kind in TOKEN_PROVIDERS if b.provider(kind)), None)
        if tokens is not None:
            inputs["tokens"] = tokens.id
            params["eval_source_kind"] = next(k for k in TOKEN_PROVIDERS if k in tokens.provides).split(":")[1]
        elif ev.path:
            files = {**files, "eval_text": ev.path}
        params.update(eval_text=ev.identity, eval_ctx=ev.ctx, eval_chunks=ev.chunks)
    b.add(f"{fmt}.validate", "hf.validate", fmt, f"{fmt.upper()} validate and measure" if ev else f"{fmt.upper()} validate",
          inputs=inputs, outputs=(final,), params=params, files=files,
          estimate=estimate("hf.validate", params, shape, copied), deliverable=True, exclusive=EXCLUSIVE,
          scratch=(REFERENCE_DIR,) if ev else (), gpu=o.device != "cpu")


# -- actions ---------------------------------------------------------------------------


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    return _quantize(step, ctx) if step.kind == "hf.quantize" else _validate(step, inputs, ctx)


def _text(step: Step, portion: str, n: int, seq_len: int) -> TextSource:
    if "calib" not in dict(step.files):
        raise UsageError("this step needs calibration text", hint="Pass --calib FILE.txt.")
    return TextSource(path=step.file("calib"), n_samples=n, seq_len=seq_len, seed=step.param("seed", 0),
                      portion=portion, source=step.param("calib_label") or "",
                      cache_dir=str(cache_root() / "calibration"))


def _quantize(step: Step, ctx: StepContext) -> StepOutcome:
    out = ctx.path(step.outputs[0])
    shutil.rmtree(out, ignore_errors=True)  # per-layer state lives in the scratch folder, not here
    prm = dict(step.params)
    job = QuantizeJob(
        backend=prm["backend"], format=step.format, model=step.file("model"), output_dir=str(out),
        calibration=_text(step, "calibration", prm["calib_samples"], prm["calib_seq_len"]),
        bits=prm["bits"], group_size=prm["group_size"], device=prm["device"],
        checkpoint_dir=str(ctx.path(step.scratch[0])), trust_remote_code=prm.get("trust_remote_code", False),
        moe_routing=prm.get("moe_routing", "routed"), **prm["job"],
    )
    # On a CPU, float sums in another thread count give other bytes: the quantization always uses
    # every usable core, whatever runs beside it, so a resumed or repeated run makes the same folder.
    threads = None if _on_gpu(prm["device"]) else len(os.sched_getaffinity(0))
    events, peak = run_worker(ctx, job, prm["backend"], f"{step.format.upper()} quantization", threads)
    _normal_permissions(out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    parameters = _parameters(Path(step.file("model")))
    assert events.result is not None
    facts = {"metadata": events.result.get("metadata", {}), "layers": len(events.layers),
             "trust_remote_code": bool(prm.get("trust_remote_code")),
             "resumed_layers": sum(1 for e in events.layers if e.get("resumed")),  # restored from checkpoints
             "bits_per_weight": round(size * 8 / parameters, 3) if parameters else None,
             "layer_peaks": [{"index": e["index"], "peak_rss_bytes": e["peak_rss_bytes"],
                              "peak_gpu_bytes": e.get("peak_gpu_bytes")} for e in events.layers]}
    if prm.get("experts"):
        try:
            facts["expert_coverage"] = _coverage(prm, facts["metadata"].get("quant_log") or [], ctx)
        except UsageError:  # --strict-coverage: nothing of this quantization is delivered
            shutil.rmtree(out, ignore_errors=True)
            raise
    return StepOutcome((out,), facts, peak, _peak_gpu(events))


def _coverage(prm: Mapping[str, Any], quant_log: list[Mapping[str, Any]], ctx: StepContext) -> dict[str, Any]:
    """Each expert's calibration samples, from the backend's per-module log: a warning below
    --min-expert-tokens, a failure with --strict-coverage."""
    layers = from_module_samples(quant_log, int(prm["experts"]))
    found = coverage_facts(layers, int(prm["min_expert_tokens"]), f"{prm['backend']} per-module calibration samples")
    if not layers:
        found["summary"] = f"{prm['backend']} reported no per-expert samples"
    elif found["below"] and prm.get("strict_coverage"):
        raise UsageError(f"expert coverage: {found['summary']}", hint="More or more varied --calib text (or more "
                         "--calib-samples) routes tokens to every expert; or lower --min-expert-tokens.")
    elif found["below"]:
        ctx.warning(f"expert coverage: {found['summary']}; their calibration is thin (--strict-coverage fails instead)")
    return found


def _peak_gpu(events: Events) -> int:
    return max((e.get("peak_gpu_bytes") or 0 for e in events.layers), default=0)


def _parameters(model: Path) -> int:
    return sum(parameter_counts(ModelSource(model, model.name, None, None)).values())


def _normal_permissions(folder: Path) -> None:
    """Some libraries save through private temp files (mode 0600); artifacts on a shared
    build server must be readable like any other file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _validate(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    partial = inputs["artifact"].path
    final = ctx.path(step.outputs[0])
    evaluate = step.param("eval_chunks", 0)
    source = str(inputs["tokens"].path) if "tokens" in inputs else dict(step.files).get("eval_text")
    job = ValidateJob(model=step.file("model"), quantized=str(partial),
                      text=_text(step, "held_out", step.param("samples"), step.param("seq_len")),
                      device=step.param("device"), eval_source=source if evaluate else None,
                      eval_source_kind=step.param("eval_source_kind", "text"), eval_ctx=step.param("eval_ctx", 512),
                      eval_chunks=evaluate if source else 0,
                      reference_cache=str(ctx.path(REFERENCE_DIR) / "reference.safetensors") if evaluate else None,
                      trust_remote_code=step.param("trust_remote_code", False))
    events, peak = run_worker(ctx, job, VALIDATE_BACKEND, f"validating {final.name}")
    assert events.result is not None
    meta = events.result.get("metadata", {})
    kl = meta.get("kl_divergence")
    if not meta.get("finite", False) or not isinstance(kl, (int, float)) or not math.isfinite(kl):
        raise ValidationFailedError(f"{final.name} produced non-finite logits or no KL divergence")
    changed = _changed_tokenizer_files(Path(step.file("model")), partial)
    if changed:
        raise ValidationFailedError(f"{final.name} does not carry the source's tokenizer files unchanged: "
                                    f"{', '.join(changed)}")
    ctx.check_final(final)
    facts = {"validated": True, "kl_divergence": kl, "tokens": meta.get("tokens"), "quality": meta.get("eval")}
    return StepOutcome((), facts, peak, renames=((partial, final),))


def _changed_tokenizer_files(source: Path, folder: Path) -> list[str]:
    """The source's tokenizer files (the chat template among them) that the folder lacks or holds changed."""
    return [name for name in TOKENIZER_FILES if (source / name).is_file()
            and not ((folder / name).is_file() and sha256_file(folder / name) == sha256_file(source / name))]
