"""What AWQ and GPTQ share: a quantize step run by a backend worker in its own environment,
then a validate step that reloads the artifact in a separate worker and measures its KL
divergence against the unquantized model, then renames ``NAME.partial`` to ``NAME``.

Workers talk JSON-line events (workers/protocol.py) on their own channel; this module
turns them into progress, warnings, journal facts and qwrap errors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import envs
from ..context import RunContext, StepOutcome, run_tool
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
from ..hub import ModelSource
from ..plan import Step, StepBuilder
from ..request import Request
from ..toolchain import REPO_ROOT, cache_root, gpu_present
from ..workers import protocol as p

VALIDATE_SAMPLES = 8
VALIDATE_SEQ_LEN = 128
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Events:
    """What a worker said, collected while it runs."""

    ctx: RunContext
    step_id: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        try:
            event = p.parse_event(line)
        except p.ProtocolError as exc:
            self.ctx.reporter.warning(f"{self.step_id}: ignored a malformed worker event ({exc})")
            return
        kind = event["event"]
        if kind == "layer_done":
            self.layers.append(event)
            self.ctx.reporter.step_progress(self.step_id, event["index"] + 1, event["total"], "layers")
        elif kind == "progress":
            self.ctx.reporter.step_progress(self.step_id, event["done"], event["total"], event["unit"])
        elif kind == "warning":
            # Libraries' warnings can be pages long (autoawq's deprecation notice): one line
            # on screen, the whole text is in the step log.
            lines = [line.strip() for line in str(event["message"]).splitlines() if line.strip()]
            first = lines[0] if lines else ""
            more = " (more in the step log)" if len(lines) > 1 else ""
            self.ctx.reporter.warning(f"{self.step_id}: {first}{more}")
        elif kind == "result":
            self.result = event
        elif kind == "error":
            self.error = event


def artifact_name(source: ModelSource, fmt: str, bits: int, group: int) -> str:
    return f"{source.name}-{fmt.upper()}-{bits}bit-g{group}"


def read_widths(source: ModelSource) -> list[int]:
    """The layer widths a group size must divide (hidden and intermediate sizes)."""
    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError):
        return []
    text = config.get("text_config", config)
    return [int(text[k]) for k in ("hidden_size", "intermediate_size") if isinstance(text.get(k), int)]


def check_common(request: Request, fmt: str, backend: str) -> None:
    o = request.quant_options
    if o.bits not in p.BITS[fmt]:
        raise UsageError(f"{fmt.upper()} supports --bits {', '.join(map(str, p.BITS[fmt]))}, not {o.bits}")
    if o.group_size != -1 and o.group_size not in (32, 64, 128, 256, 512, 1024):
        raise UsageError(f"--group-size {o.group_size} is not supported", hint="Use 32, 64, 128 (default) or 256.")
    if o.device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}")
    if o.device == "cuda" and not gpu_present():
        raise BackendUnavailableError("--device cuda was given but this host has no NVIDIA GPU",
                                      hint="Use --device cpu (or auto).")
    if o.calib_samples < 1 or o.calib_seq_len < 16:
        raise UsageError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
    if (backend, fmt) not in p.WORKER_MODULES:
        raise UsageError(f"backend {backend} does not produce {fmt.upper()}")


def check_group_divides(source: ModelSource, group: int) -> None:
    for width in read_widths(source):
        if group > 0 and width % group:
            raise UsageError(
                f"--group-size {group} does not divide the model's layer width {width}",
                hint="Choose a group size that divides " + " and ".join(map(str, read_widths(source))) + ".",
            )


def add_quant_steps(b: StepBuilder, request: Request, source: ModelSource, calib_sha: str | None,
                    *, fmt: str, backend: str, params: dict[str, Any]) -> None:
    o = request.quant_options
    check_group_divides(source, o.group_size)
    final = artifact_name(source, fmt, o.bits, o.group_size)
    common = {"backend": backend, "bits": o.bits, "group_size": o.group_size, "calib_sha256": calib_sha,
              "calib_samples": o.calib_samples, "calib_seq_len": o.calib_seq_len, "seed": o.seed,
              "device": o.device, **params}
    q = b.add(f"{fmt}.quantize", "hf.quantize", fmt, f"{fmt.upper()} quantize ({backend})",
              outputs=(final + ".partial",), params=common)
    b.add(f"{fmt}.validate", "hf.validate", fmt, f"{fmt.upper()} validate",
          inputs=(q.id,), outputs=(final,),
          params={"samples": VALIDATE_SAMPLES, "seq_len": VALIDATE_SEQ_LEN, "quant": f"{o.bits}bit-g{o.group_size}"},
          deliverable=True)


def estimate_bytes(step: Step, parameters: int) -> int:
    if step.kind == "hf.quantize":
        bits = step.param("bits", 4)
        return int(parameters * (bits / 8 + 4 / max(step.param("group_size", 128), 32)) * 1.1) + (16 << 20)
    return 0


# -- actions ---------------------------------------------------------------------------


def execute(step: Step, ctx: RunContext) -> StepOutcome:
    return _quantize(step, ctx) if step.kind == "hf.quantize" else _validate(step, ctx)


def _worker_env(ctx: RunContext) -> dict[str, str | None]:
    threads = str(ctx.threads)
    return {
        "PYTHONPATH": str(REPO_ROOT / "wrapper"),
        "PYTHONUNBUFFERED": "1",
        # gptqmodel sizes its CPU worker pools from this and needs at least 2
        "GPTQMODEL_CPU_WORKERS": str(max(2, os.cpu_count() or 1)),
        "OMP_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run_worker(ctx: RunContext, step: Step, job: p.QuantizeJob | p.ValidateJob, env_name: str,
                what: str) -> tuple[Events, int]:
    python = envs.find_env(env_name).python
    jobs = ctx.checkpoint / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job_file = p.write_job(job, jobs / f"{step.id.replace(':', '-')}.json")
    events = Events(ctx, step.id)
    argv: list[str | os.PathLike[str]] = [python, "-m", p.worker_module(job), job_file]
    try:
        # cwd: libraries that drop log files into the working directory (gptqmodel) do it there
        cwd = ctx.checkpoint / "logs" / "libraries"
        cwd.mkdir(parents=True, exist_ok=True)
        result = run_tool(ctx, step.id, argv, what=what, env=_worker_env(ctx), on_event=events, cwd=cwd)
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


def _text(ctx: RunContext, portion: str, n: int, seq_len: int) -> p.TextSource:
    calib = ctx.calib_text()
    o = ctx.request.quant_options
    label = "wikitext2" if ctx.request.calib in (None, "wikitext2") else calib.name
    return p.TextSource(path=str(calib), n_samples=n, seq_len=seq_len, seed=o.seed, portion=portion,
                        source=label, cache_dir=str(cache_root() / "calibration"))


def _quantize(step: Step, ctx: RunContext) -> StepOutcome:
    o = ctx.request.quant_options
    out = ctx.output / step.outputs[0]
    shutil.rmtree(out, ignore_errors=True)  # per-layer state lives in checkpoint_dir, not here
    job = p.QuantizeJob(
        backend=step.param("backend"), format=step.format, model=str(ctx.source.path), output_dir=str(out),
        calibration=_text(ctx, "calibration", o.calib_samples, o.calib_seq_len),
        bits=o.bits, group_size=o.group_size, zero_point=o.zero_point, version=o.awq_version,
        sym=o.sym, act_order=o.act_order, damp=o.damp, device=o.device,
        checkpoint_dir=str(ctx.checkpoint / "layers" / f"{step.format}-{step.fingerprint[:12]}"),
    )
    events, peak = _run_worker(ctx, step, job, step.param("backend"), f"{step.format.upper()} quantization")
    _normal_permissions(out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    bpw = size * 8 / ctx.parameters if ctx.parameters else None
    gpu = max((e.get("peak_gpu_bytes") or 0 for e in events.layers), default=0)
    assert events.result is not None
    info = {"metadata": events.result.get("metadata", {}), "layers": len(events.layers),
            "bits_per_weight": round(bpw, 3) if bpw else None,
            "layer_peaks": [{"index": e["index"], "peak_rss_bytes": e["peak_rss_bytes"],
                             "peak_gpu_bytes": e.get("peak_gpu_bytes")} for e in events.layers]}
    return StepOutcome([out], info, peak, gpu)


def _normal_permissions(folder: Path) -> None:
    """Some libraries save through private temp files (mode 0600); artifacts on a shared
    build server must be readable like any other file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _validate(step: Step, ctx: RunContext) -> StepOutcome:
    partial = ctx.output / ctx.plan_outputs(step.inputs[0])[0]
    final = ctx.output / step.outputs[0]
    job = p.ValidateJob(model=str(ctx.source.path), quantized=str(partial),
                        text=_text(ctx, "held_out", step.param("samples"), step.param("seq_len")),
                        device=ctx.request.quant_options.device)
    events, peak = _run_worker(ctx, step, job, p.VALIDATE_BACKEND, f"validating {final.name}")
    assert events.result is not None
    meta = events.result.get("metadata", {})
    kl = meta.get("kl_divergence")
    if not meta.get("finite", False) or kl is None or not math.isfinite(kl):
        raise ValidationFailedError(f"{final.name} produced non-finite logits or no KL divergence")
    ctx.check_final(final)
    info = {"validated": True, "kl_divergence": kl, "quality": f"KL {kl:.4f}", "tokens": meta.get("tokens")}
    return StepOutcome([], info, peak, renames=[(partial, final)])
