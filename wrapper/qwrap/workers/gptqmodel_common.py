"""GPTQModel 7.6 plumbing shared by ``gptq_gptqmodel`` and ``awq_gptqmodel``.

GPTQModel drives the layer loop itself and has a pickle-free checkpoint store (content-
addressed safetensors + JSON, published atomically, resumed automatically). qwrap uses it as
is and listens: the model's layer/subset callbacks say when a layer starts, and a wrapper
around the store's boundary hook says when a layer's checkpoint is committed (it has no
public commit hook), which is when ``layer_done`` is reported. Without a checkpoint,
``layer_done`` follows the layer's finalization.

GPTQModel 7.6 allows its checkpoint for the model types it tested (llama, qwen3_moe), but
its state adapter knows no architecture: at a layer boundary it records every packed module,
every materialized dense tensor, each processor's state (the cached inputs of the next layer
with their replay kwargs, logs, results), the loop's shared key/value dict and the RNGs, and
restores them after replaying calibration capture (checked against the checkpoint's hash).
What it cannot hold is state a model definition keeps in its own code between layers, so
qwrap admits other model types when GPTQModel's definition replays layers with the generic
loop only (``resume_refusal``), and keeps every other refusal GPTQModel makes.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwrap.workers import protocol as p
from qwrap.workers.runtime import (
    LayerMeter,
    WorkerError,
    check_group_size,
    failure_event,
    resolve_device,
    versions,
    warn,
)

CHECKPOINT_SUBDIR = "gptqmodel"
CHECKPOINT_MODEL_TYPES = ("llama", "qwen3_moe")  # gptq_checkpoint.validate_checkpoint_support
# BaseQModel hooks a definition may override that run between or around layers of the loop,
# with state of their own that a layer checkpoint does not describe.
LAYER_HOOKS = ("pre_quantize", "post_quantize", "prepare_layer_replay_kwargs",
               "update_layer_replay_kwargs_from_output", "after_quantize")


def prepare_environment() -> None:
    """Before gptqmodel is imported: its CPU thread pool needs every core (with the default
    of half the cores a 2-core host gets one worker), and its JIT-built CPU kernels go into
    this environment (built for its torch) instead of ~/.cache."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(cores or 1))
    cache = Path(sys.prefix) / "var" / "gptqmodel"
    os.environ.setdefault("GPTQMODEL_CACHE_DIR", str(cache))
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))


def quantize(job: p.QuantizeJob, *, settings: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Run one GPTQModel quantization (``settings``: QuantizeConfig fields)."""
    prepare_environment()
    p.emit(p.Started(task="quantize", backend="gptqmodel", pid=os.getpid(), device=job.device,
                     versions=versions("gptqmodel")))
    from transformers import AutoTokenizer

    from qwrap.workers import artifact
    from qwrap.workers.calib import load_samples

    started = time.monotonic()
    device = resolve_device(job.device)
    model_dir = Path(job.model)
    if settings.get("method") == "awq" and device == "cpu" and job.version != "gemm":
        raise WorkerError("unsupported", f"gptqmodel writes AWQ {job.version} only on CUDA",
                          hint="Use --awq-version gemm on CPU.")
    samples = load_samples(job.calibration, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=job.trust_remote_code),
                           model_dir)
    p.emit(p.Progress(stage="calibration", done=job.calibration.n_samples,
                      total=job.calibration.n_samples, unit="samples"))
    if job.moe_routing == "all":  # every calibration token through every expert of a layer
        settings = {**settings, "moe": {"routing": {"class": "ExpertsRoutingOverride", "num_experts_per_tok": "all"}}}
    model = _load(model_dir, settings, device, trust=job.trust_remote_code)
    check_group_size(model.model, job.group_size)
    p.emit(p.Progress(stage="load", done=1, total=1, unit="model"))
    total = int(model.model.config.num_hidden_layers)
    checkpoint = _checkpoint_config(job, model)
    listener = Listener(total, LayerMeter(cuda=device == "cuda"), checkpointed=checkpoint is not None)
    model.layer_callback = listener
    model.subset_callback = listener
    with _admitting(model), _reporting_aborts(), _reporting_commits(listener), _checkpoint_errors():
        model.quantize(_calibration(samples.as_lists()), batch_size=1, backend=_backend(settings, device),
                       checkpoint=checkpoint)
    out = Path(job.output_dir)
    quant_log = _save(model, model_dir, out)
    artifact.write_metadata(out, metadata | {"calibration": samples.metadata,
                                              "versions": versions("gptqmodel")})
    artifact.check_complete(out)
    p.emit(p.Result(output_dir=str(out), files=artifact.list_files(out), metadata={
        **metadata, "calibration": samples.metadata, "versions": versions("gptqmodel"),
        "device": device, "calibration_cache_hit": samples.cache_hit, "quant_log": quant_log,
        "seconds": round(time.monotonic() - started, 3)}))


def _load(model_dir: Path, settings: dict[str, Any], device: str, *, trust: bool) -> Any:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(offload_to_disk=True, **settings)
    # AWQ in float16, the dtype AWQ kernels expect: GPTQModel keeps AWQ scales in the model's
    # dtype but restores checkpointed AWQ layers with float16 scales, so a bfloat16 model
    # could not resume.
    extra = {"dtype": torch.float16} if settings.get("method") == "awq" else {}
    return GPTQModel.load(str(model_dir), config, device=device, trust_remote_code=trust, **extra)


def _backend(settings: dict[str, Any], device: str) -> Any:
    from gptqmodel import BACKEND

    # GPTQModel's AUTO picks the CUDA AWQ GEMM kernel to pack AWQ even on CPU.
    return BACKEND.AWQ_TORCH if settings.get("method") == "awq" and device == "cpu" else BACKEND.AUTO


def _calibration(rows: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": row, "attention_mask": [1] * len(row)} for row in rows]


def _checkpoint_config(job: p.QuantizeJob, model: Any) -> Any:
    if job.checkpoint_dir is None:
        return None
    model_type = model.model.config.model_type
    refusal = resume_refusal(type(model), model_type, model.model)
    if refusal is not None:
        warn(f"gptqmodel cannot resume {model_type} at a layer: {refusal}; "
             "an interrupted run restarts from the first layer")
        return None
    from gptqmodel.looper.checkpoint_store import CheckpointConfig

    return CheckpointConfig(path=str(Path(job.checkpoint_dir) / CHECKPOINT_SUBDIR), interval="layer:1")


def resume_refusal(definition: type, model_type: str, module: Any = None) -> str | None:
    """Why GPTQModel's layer checkpoint would not restore a run of ``definition`` (a GPTQModel
    model definition class) exactly, or None. ``module``: the loaded transformers model."""
    if model_type in CHECKPOINT_MODEL_TYPES:
        return None
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.nn_modules.converter import MODULE_CONVERTER_MAP

    if BaseQModel not in definition.__mro__[1:]:
        return f"{definition.__name__} is not a GPTQModel model definition"
    own = definition.__mro__[:definition.__mro__.index(BaseQModel)]  # the definition and its bases below BaseQModel
    hooks = sorted({name for cls in own for name in vars(cls) if name in LAYER_HOOKS})
    if hooks:
        return (f"GPTQModel's {definition.__name__} runs its own code between layers ({', '.join(hooks)}), "
                "whose state a layer checkpoint does not hold")
    if getattr(definition, "write_shared_kv_cache", False) or (
            module is not None and any(getattr(m, "reuse_kv", False) for m in module.modules())):
        return "its layers pass key/value state to later layers outside their inputs"
    if model_type in MODULE_CONVERTER_MAP:
        return "GPTQModel converts its layers while quantizing, and a resumed run skips that for the restored ones"
    return None


@contextmanager
def _admitting(model: Any) -> Iterator[None]:
    """GPTQModel's own checkpoint refusals, all but its model-type list, for a model type
    that ``resume_refusal`` admits."""
    from types import SimpleNamespace

    from gptqmodel.looper import gptq_checkpoint

    validate = gptq_checkpoint.validate_checkpoint_support

    def admitted(qmodel: Any, **kwargs: Any) -> None:
        stand_in = SimpleNamespace(quantize_config=qmodel.quantize_config,
                                   model=SimpleNamespace(config=SimpleNamespace(model_type=CHECKPOINT_MODEL_TYPES[0])))
        validate(stand_in, **kwargs)

    if model.model.config.model_type not in CHECKPOINT_MODEL_TYPES:
        gptq_checkpoint.validate_checkpoint_support = admitted
    try:
        yield
    finally:
        gptq_checkpoint.validate_checkpoint_support = validate


class Listener:
    """GPTQModel's layer_callback / subset_callback, turned into protocol events."""

    def __init__(self, total: int, meter: LayerMeter, *, checkpointed: bool) -> None:
        self.total = total
        self.meter = meter
        self.checkpointed = checkpointed
        self.current = -1

    def subset_event(self, *, stage: str, layer_idx: int, **_: Any) -> None:
        if stage == "forward_start" and layer_idx != self.current and 0 <= layer_idx < self.total:
            self.current = layer_idx
            self.meter.start()
            p.emit(p.LayerStarted(index=layer_idx, total=self.total))

    def layer_complete(self, *, layer_idx: int, submodule_finalized: bool) -> None:
        if submodule_finalized and not self.checkpointed and 0 <= layer_idx < self.total:
            p.emit(self.meter.stop(layer_idx, self.total))

    def committed(self, index: int, root: Path) -> None:
        p.emit(p.CheckpointSaved(index=index, path=str(root)))
        p.emit(self.meter.stop(index, self.total))

    def resumed(self, indices: list[int]) -> None:
        if indices:
            warn(f"resuming from gptqmodel checkpoint: layers 0-{indices[-1]} are done")
        for index in indices:
            p.emit(p.LayerDone(index=index, total=self.total, seconds=0.0, peak_rss_bytes=0, resumed=True))


@contextmanager
def _reporting_aborts() -> Iterator[None]:
    """GPTQModel's device workers end the process (``os._exit(1)``) when a task raises, racing
    the main thread that would report the failure: the error event goes out first."""
    from gptqmodel.utils import threadx

    abort = threadx._DeviceWorker._abort_process

    def reported(self: Any, exc: BaseException) -> None:
        p.emit(failure_event(exc, "gptqmodel"))
        abort(self, exc)

    threadx._DeviceWorker._abort_process = reported
    try:
        yield
    finally:
        threadx._DeviceWorker._abort_process = abort


@contextmanager
def _reporting_commits(listener: Listener) -> Iterator[None]:
    from gptqmodel.looper.checkpoint import CheckpointExtension

    on_start, on_boundary = CheckpointExtension.on_start, CheckpointExtension.on_boundary

    def start(self: Any, context: Any) -> Any:
        try:
            cursor = on_start(self, context)
        except TypeError as exc:  # its codec cannot store a layer input of this model (before any layer)
            warn(f"gptqmodel's checkpoint cannot hold this model's layer inputs ({exc}): "
                 "an interrupted run restarts from the first layer")
            self.qwrap_off = True
            listener.checkpointed = False
            return 0
        listener.resumed([s.index for s in context.plan.steps[:cursor] if s.kind == "layer"])
        return cursor

    def boundary(self: Any, loop_boundary: Any) -> None:
        if getattr(self, "qwrap_off", False):
            if self._stop_requested:  # SIGINT/SIGTERM, caught by gptqmodel's checkpoint session
                from gptqmodel.looper.checkpoint import CheckpointStopped

                raise CheckpointStopped("stopped at a layer boundary, without a checkpoint")
            return
        on_boundary(self, loop_boundary)
        if loop_boundary.step.kind == "layer":
            listener.committed(loop_boundary.step.index, self.store.root)

    CheckpointExtension.on_start, CheckpointExtension.on_boundary = start, boundary
    try:
        yield
    finally:
        CheckpointExtension.on_start, CheckpointExtension.on_boundary = on_start, on_boundary


@contextmanager
def _checkpoint_errors() -> Iterator[None]:
    from gptqmodel.looper.checkpoint import CheckpointStopped
    from gptqmodel.looper.checkpoint_store import CheckpointError

    try:
        yield
    except CheckpointStopped as exc:
        raise WorkerError("interrupted", str(exc), hint="Rerun the same command to resume.") from exc
    except CheckpointError as exc:
        raise WorkerError("checkpoint", f"gptqmodel checkpoint: {exc}",
                          hint="Remove the run's .checkpoint folder to start over.") from exc


def _save(model: Any, model_dir: Path, out: Path) -> list[dict[str, str]]:
    """Save, then drop what differs between runs: timings, temp paths, rewritten tokenizers."""
    from qwrap.workers import artifact

    artifact.sort_buffers(model.model)
    model.save(str(out))
    quant_log = _pop_quant_log(out / "quant_log.csv")
    for name in ("config.json", "quantize_config.json"):
        if (out / name).is_file():
            artifact.edit_json(out / name, _drop_offload_path)
    artifact.use_source_files(model_dir, out)
    return quant_log


def _drop_offload_path(data: dict[str, Any]) -> None:
    config = data.get("quantization_config", data)
    config.get("meta", {}).pop("offload_to_disk_path", None)


def _pop_quant_log(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]
    path.unlink()
    return rows
