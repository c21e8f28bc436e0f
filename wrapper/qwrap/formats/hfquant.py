"""What AWQ and GPTQ share: their common options, a quantize step run by a backend worker in
its own environment, then a validate step that reloads the artifact in a separate worker and
measures its KL divergence against the unquantized model, then renames ``NAME.partial`` to
``NAME``.

Workers talk JSON-line events (workers/protocol.py) on their own channel; this module
turns them into progress, warnings, facts and qwrap errors. awq.py and gptq.py add their
own options and worker-job fields.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..checks import Check
from ..context import Inputs, StepContext, StepOutcome
from ..errors import (
    BackendUnavailableError,
    Interrupted,
    OutOfMemoryError,
    QwrapError,
    StepFailedError,
    UnsupportedModelError,
    UsageError,
    ValidationFailedError,
)
from ..options import Listing, Option
from ..plan import Estimate, Plan, PlanBuilder, Step

if TYPE_CHECKING:
    from ..model import ModelInfo, Shape
    from ..workers import protocol as p

MiB = 1 << 20


def _protocol() -> Any:
    """The worker protocol module, loaded when first needed (not for --help)."""
    from ..workers import protocol

    return protocol

VALIDATE_SAMPLES = 8
VALIDATE_SEQ_LEN = 128
DEVICES = ("auto", "cpu", "cuda")
PANEL = "AWQ and GPTQ"
# One AWQ/GPTQ worker at a time: each holds the model (and the GPU, when there is one), and two
# on one GPU would run it out of memory; GGUF steps still run beside them.
WORKERS = "hf-worker"
TOKEN_PROVIDERS = ("eval-tokens:llama-kld",)  # steps whose output holds the evaluation's token ids
REFERENCE_DIR = ".checkpoint/work/hf-reference"  # the source's log-probs on them, once per run

COMMON_OPTIONS = (
    Option("bits", int, 4, "AWQ/GPTQ bits (AWQ: 4; GPTQ: 2, 3, 4 or 8)."),
    Option("group_size", int, 128, "AWQ/GPTQ group size; must divide the layer widths."),
    Option("calib_samples", int, 128, "AWQ/GPTQ calibration samples."),
    Option("calib_seq_len", int, 512, "AWQ/GPTQ calibration sequence length (tokens)."),
    Option("device", str, "auto", "AWQ/GPTQ device: auto (CUDA when present), cpu or cuda."),
    Option("trust_remote_code", bool, False, "AWQ/GPTQ: run the model's own Python code (config.json auto_map, "
           "its modeling_*.py) in the backend workers. Off by default: only for models whose code you trust."),
)


@dataclass(frozen=True)
class Common:
    """The options AWQ and GPTQ share; each format's Options extends it."""

    backend: str
    bits: int = 4
    group_size: int = 128
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False


OptionsT = TypeVar("OptionsT", bound=Common)


def make(cls: type[OptionsT], values: Mapping[str, Any], backend: str) -> OptionsT:
    names = {f.name for f in fields(cls)} - {"backend"}
    return cls(backend=backend, **{k: v for k, v in values.items() if k in names})


def from_json(cls: type[OptionsT], data: Mapping[str, Any], default_backend: str) -> OptionsT:
    names = {f.name for f in fields(cls)}
    return cls(**{"backend": default_backend, **{k: v for k, v in data.items() if k in names}})


def validate_common(o: Common, fmt: str) -> None:
    p = _protocol()
    if o.bits not in p.BITS[fmt]:
        raise UsageError(f"{fmt.upper()} supports --bits {', '.join(map(str, p.BITS[fmt]))}, not {o.bits}")
    if o.group_size != -1 and o.group_size not in (32, 64, 128, 256, 512, 1024):
        raise UsageError(f"--group-size {o.group_size} is not supported", hint="Use 32, 64, 128 (default) or 256.")
    if o.device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}")
    from ..toolchain import gpu_present

    if o.device == "cuda" and not gpu_present():
        raise BackendUnavailableError("--device cuda was given but this host has no NVIDIA GPU",
                                      hint="Use --device cpu (or auto).")
    if o.calib_samples < 1 or o.calib_seq_len < 16:
        raise UsageError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
    if (o.backend, fmt) not in p.WORKER_MODULES:
        raise UsageError(f"backend {o.backend} does not produce {fmt.upper()}")


def needs_calibration(o: Common) -> bool:
    return True


def wants_calibration(o: Common) -> bool:
    return True


def requirements(o: Common) -> tuple[str, ...]:
    return (o.backend, _protocol().VALIDATE_BACKEND)  # validation reloads artifacts there


def read_widths(config: Mapping[str, Any]) -> list[int]:
    """The layer widths a group size must divide (hidden and intermediate sizes)."""
    text = config.get("text_config", config)
    return [int(text[k]) for k in ("hidden_size", "intermediate_size") if isinstance(text.get(k), int)]


def checks(o: Common, model: ModelInfo, *, thorough: bool) -> list[Check]:
    return [_custom_code_check(o, model), _group_size_check(o, model)]


def _group_size_check(o: Common, model: ModelInfo) -> Check:
    widths = read_widths(model.config)
    bad = [w for w in widths if o.group_size > 0 and w % o.group_size]
    if not bad:
        return Check("group size", True, f"{o.group_size} divides the layer widths {widths}")
    error = UsageError(f"--group-size {o.group_size} does not divide the model's layer width {bad[0]}",
                       hint="Choose a group size that divides " + " and ".join(map(str, widths)) + ".")
    return Check("group size", False, error.message, error)


def _custom_code_check(o: Common, model: ModelInfo) -> Check:
    """The backends load the model with transformers: a model that ships its own code needs
    it run, which qwrap does only with --trust-remote-code."""
    from ..modelfiles import custom_code

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
    from ..toolchain import gpu_present

    return device == "cuda" or (device == "auto" and gpu_present())


def artifact_name(model_name: str, fmt: str, bits: int, group: int) -> str:
    return f"{model_name}-{fmt.upper()}-{bits}bit-g{group}"


def folder_bytes(shape: Shape, bits: int, group: int) -> int:
    """Expected size of an AWQ/GPTQ folder: packed linear weights plus a 16-bit scale and a
    packed zero point per group; embeddings, lm_head and norms stay 16-bit."""
    linear = shape.parameters - shape.vocab_embed - shape.output - shape.norms
    per_group = (2 + bits / 8) / (group if group > 0 else 4096)
    data = linear * (bits / 8 + per_group) + (shape.vocab_embed + shape.output + shape.norms) * 2
    return int(data) + shape.metadata_bytes * 4  # tokenizer files copied along


def estimate(kind: str, params: Mapping[str, Any], shape: Shape) -> Estimate:
    """The one estimator of both AWQ/GPTQ step kinds."""
    ram = shape.parameters * 4 + 1024 * MiB  # a float32 copy on CPU plus activations
    size = folder_bytes(shape, params["bits"], params["group_size"])
    if kind == "hf.quantize":
        return Estimate(size, ram, 2 * size)  # the folder plus its per-layer checkpoints
    # hf.validate: reloads it, renames it; with the evaluation, the source (once per run, then
    # cached) and the artifact each run a forward pass over the chunks (no cost model otherwise)
    tokens = int(params.get("eval_chunks") or 0) * int(params.get("eval_ctx") or 0)
    if not tokens:
        return Estimate(size, ram, 0)
    from .. import evaltext

    return Estimate(size, ram, 0, 2 * evaltext.torch_seconds(shape.parameters, tokens,
                                                             gpu=_on_gpu(str(params.get("device")))))


def add_steps(b: PlanBuilder, o: Common, model: ModelInfo, *, fmt: str, own: Mapping[str, Any]) -> None:
    """``own``: the format's worker-job fields (e.g. AWQ's zero_point and version)."""
    shape = model.shape
    final = artifact_name(model.source.name, fmt, o.bits, o.group_size)
    calib = model.calibration
    files = {"model": str(model.source.path), **({"calib": calib.path} if calib and calib.path else {})}
    params = {"backend": o.backend, "bits": o.bits, "group_size": o.group_size,
              "calib": calib.identity if calib else None, "calib_label": calib.label if calib else None,
              "calib_samples": o.calib_samples, "calib_seq_len": o.calib_seq_len, "seed": o.seed,
              "device": o.device, "trust_remote_code": o.trust_remote_code, "job": dict(own)}
    # per-layer checkpoints, named by the step's fingerprint so other options never reuse them
    q = b.add(f"{fmt}.quantize", "hf.quantize", fmt, f"{fmt.upper()} quantize ({o.backend})",
              outputs=(final + ".partial",), params=params, files=files,
              estimate=estimate("hf.quantize", params, shape), threaded=not _on_gpu(o.device), exclusive=WORKERS,
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
          estimate=estimate("hf.validate", params, shape), deliverable=True, exclusive=WORKERS,
          scratch=(REFERENCE_DIR,) if ev else (), gpu=o.device != "cpu")


def plan_artifact(step: Step, plan: Plan) -> dict[str, Any]:
    size = step.estimate.output_bytes
    return {"format": step.format, "quant": step.param("quant"), "name": Path(step.outputs[0]).name,
            "expected_bytes": size,
            "bits_per_weight": round(size * 8 / plan.parameters, 3) if plan.parameters else None}


def result_fields(own: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]],
                  readers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    produced = inputs.get("artifact", {})
    quality = own.get("quality")  # on the run's evaluation chunks, the same tokens as the GGUF rows
    if quality is None and own.get("kl_divergence") is not None:  # --no-eval: the held-out validation KL
        quality = {"kld_mean": own["kl_divergence"], "tokens": own.get("tokens"), "runtime": "transformers",
                   "weights": None}
    elif quality is not None:  # measured as loaded: its deployment runtime is the common one
        quality = {**quality, "weights": {k: v for k, v in quality.items() if k != "weights"}}
    return {"bits_per_weight": produced.get("bits_per_weight"), "quality": quality,
            "calibration": produced.get("metadata", {}).get("calibration"),
            "trust_remote_code": bool(produced.get("trust_remote_code"))}


LIBRARY = "transformers"


def publishable(path: Path) -> str | None:
    """A folder without its quantization_config loads as an unquantized model (users report
    "very bad" output from such pushes): refuse it."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return f"{path.name} has no readable config.json"
    if not isinstance(config, dict) or not config.get("quantization_config"):
        return (f"{path.name}/config.json has no quantization_config: transformers would load it as an "
                "unquantized model")
    return None


def card_usage(paths: list[str], *, chat: bool) -> str:
    name = paths[0]
    applied = ("messages = [{\"role\": \"user\", \"content\": \"Hello\"}]\n"
               "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")\n"
               "print(tokenizer.decode(model.generate(inputs.to(model.device), max_new_tokens=32)[0]))\n") if chat else ""
    return (
        "transformers:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{name}\", device_map=\"auto\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n{applied}```\n\n"
        f"vLLM:\n\n```sh\nvllm serve {name}\n```"
    )


# -- actions ---------------------------------------------------------------------------


@dataclass
class Events:
    """What a worker said, collected while it runs."""

    ctx: StepContext
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        p = _protocol()
        try:
            event = p.parse_event(line)
        except p.ProtocolError as exc:
            self.ctx.warning(f"ignored a malformed worker event ({exc})")
            return
        kind = event["event"]
        if kind == "layer_done":
            self.layers.append(event)
            self.ctx.progress(event["index"] + 1, event["total"], "layers")
        elif kind == "progress":
            self.ctx.progress(event["done"], event["total"], event["unit"])
        elif kind == "warning":
            # Libraries' warnings can be pages long (autoawq's deprecation notice): one line
            # on screen, the whole text is in the step log.
            lines = [line.strip() for line in str(event["message"]).splitlines() if line.strip()]
            more = " (more in the step log)" if len(lines) > 1 else ""
            self.ctx.warning(f"{lines[0] if lines else ''}{more}")
        elif kind == "result":
            self.result = event
        elif kind == "error":
            self.error = event


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    return _quantize(step, ctx) if step.kind == "hf.quantize" else _validate(step, inputs, ctx)


def _worker_env(ctx: StepContext, threads: int) -> dict[str, str | None]:
    from ..envs import worker_code

    return {
        "PYTHONPATH": str(worker_code()),
        "PYTHONUNBUFFERED": "1",
        # gptqmodel sizes its CPU worker pools from this and needs at least 2
        "GPTQMODEL_CPU_WORKERS": str(max(2, os.cpu_count() or 1)),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_worker(ctx: StepContext, job: p.QuantizeJob | p.ValidateJob, env_name: str, what: str,
               threads: int | None = None) -> tuple[Events, int]:
    """Run a worker job in its environment (also GGUF's weights measurement): events to progress
    and warnings, its error event to the matching qwrap error. ``threads``: torch's thread count
    (default: the cores the runner gave the step)."""
    from .. import envs

    p = _protocol()
    python = envs.find_env(env_name).python
    jobs = ctx.checkpoint / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job_file = p.write_job(job, jobs / f"{ctx.step_id.replace(':', '-')}.json")
    events = Events(ctx)
    argv: list[str | os.PathLike[str]] = [python, "-m", p.worker_module(job), job_file]
    # cwd: libraries that drop log files into the working directory (gptqmodel) do it there
    cwd = ctx.checkpoint / "logs" / "libraries"
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        result = ctx.run_tool(argv, what=what, env=_worker_env(ctx, threads or ctx.threads), on_event=events, cwd=cwd)
    except Interrupted:
        raise
    except QwrapError as exc:
        raise (_from_event(events.error, what, exc.log_path) if events.error else exc) from None
    if events.error:
        raise _from_event(events.error, what, str(result.log_path))
    if events.result is None:
        raise StepFailedError(f"{what} exited without a result", hint=f"See {result.log_path}.")
    return events, result.peak_rss_bytes


def _from_event(error: dict[str, Any], what: str, log: str | None) -> QwrapError:
    classes: dict[str, type[QwrapError]] = {
        "oom": OutOfMemoryError,
        "backend_unavailable": BackendUnavailableError,
        "unsupported": UnsupportedModelError,
        "bad_job": UsageError,
        "validation": ValidationFailedError,
    }
    cls = classes.get(error["kind"], StepFailedError)
    hint = (error.get("hint") or "") + (f" Log: {log}" if log else "")
    return cls(f"{what}: {error['message']}", hint=hint.strip() or None, log_path=log)


def _text(step: Step, portion: str, n: int, seq_len: int) -> p.TextSource:
    from ..toolchain import cache_root

    p = _protocol()
    if "calib" not in dict(step.files):
        raise UsageError("this step needs calibration text", hint="Pass --calib FILE.txt.")
    return p.TextSource(path=step.file("calib"), n_samples=n, seq_len=seq_len, seed=step.param("seed", 0),
                        portion=portion, source=step.param("calib_label") or "",
                        cache_dir=str(cache_root() / "calibration"))


def _quantize(step: Step, ctx: StepContext) -> StepOutcome:
    out = ctx.path(step.outputs[0])
    shutil.rmtree(out, ignore_errors=True)  # per-layer state lives in the scratch folder, not here
    prm = dict(step.params)
    p = _protocol()
    job = p.QuantizeJob(
        backend=prm["backend"], format=step.format, model=step.file("model"), output_dir=str(out),
        calibration=_text(step, "calibration", prm["calib_samples"], prm["calib_seq_len"]),
        bits=prm["bits"], group_size=prm["group_size"], device=prm["device"],
        checkpoint_dir=str(ctx.path(step.scratch[0])), trust_remote_code=prm.get("trust_remote_code", False),
        **prm["job"],
    )
    # On a CPU, float sums in another thread count give other bytes: the quantization always uses
    # every usable core, whatever runs beside it, so a resumed or repeated run makes the same folder.
    threads = None if _on_gpu(prm["device"]) else len(os.sched_getaffinity(0))
    events, peak = run_worker(ctx, job, prm["backend"], f"{step.format.upper()} quantization", threads)
    _normal_permissions(out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    parameters = _parameters(Path(step.file("model")))
    gpu = max((e.get("peak_gpu_bytes") or 0 for e in events.layers), default=0)
    assert events.result is not None
    facts = {"metadata": events.result.get("metadata", {}), "layers": len(events.layers),
             "trust_remote_code": bool(prm.get("trust_remote_code")),
             "resumed_layers": sum(1 for e in events.layers if e.get("resumed")),  # restored from checkpoints
             "bits_per_weight": round(size * 8 / parameters, 3) if parameters else None,
             "layer_peaks": [{"index": e["index"], "peak_rss_bytes": e["peak_rss_bytes"],
                              "peak_gpu_bytes": e.get("peak_gpu_bytes")} for e in events.layers]}
    return StepOutcome((out,), facts, peak, gpu)


def _parameters(model: Path) -> int:
    from ..hub import parameter_counts
    from ..modelfiles import ModelSource

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
    p = _protocol()
    evaluate = step.param("eval_chunks", 0)
    source = str(inputs["tokens"].path) if "tokens" in inputs else dict(step.files).get("eval_text")
    job = p.ValidateJob(model=step.file("model"), quantized=str(partial),
                        text=_text(step, "held_out", step.param("samples"), step.param("seq_len")),
                        device=step.param("device"), eval_source=source if evaluate else None,
                        eval_source_kind=step.param("eval_source_kind", "text"), eval_ctx=step.param("eval_ctx", 512),
                        eval_chunks=evaluate if source else 0,
                        reference_cache=str(ctx.path(REFERENCE_DIR) / "reference.safetensors") if evaluate else None,
                        trust_remote_code=step.param("trust_remote_code", False))
    events, peak = run_worker(ctx, job, p.VALIDATE_BACKEND, f"validating {final.name}")
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
    from ..journal import sha256_file
    from ..workers.calib import TOKENIZER_FILES

    return [name for name in TOKENIZER_FILES if (source / name).is_file()
            and not ((folder / name).is_file() and sha256_file(folder / name) == sha256_file(source / name))]


def listing(fmt: str, backends: tuple[str, ...]) -> Listing:
    p = _protocol()
    rows = tuple((str(b), "128 (32-1024, must divide the layer widths)", ", ".join(backends)) for b in p.BITS[fmt])
    return Listing(("--bits", "--group-size", "--backend (default first)"), rows,
                   f"Artifact: a Hugging Face folder <model>-{fmt.upper()}-<bits>bit-g<group>, loadable by "
                   "transformers and vLLM.")
