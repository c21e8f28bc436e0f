"""``python -m qwrap.workers.awq_autoawq JOB.json``: AWQ with AutoAWQ 0.2.9, CPU or CUDA.

AutoAWQ's layer loop is kept (its device moves and kwargs handling are version-sensitive);
a quantizer subclass hooks the per-layer steps instead: after a layer's scales and clips
are searched they are checkpointed, and on restart a checkpointed layer replays them
instead of searching. The layer's forward pass still runs, because its output (computed
with the unscaled weights, as in an uninterrupted run) is the next layer's input; that is
cheap next to the search and keeps the resumed artifact byte-identical.

On CPU the model is processed in float32 (measured 5x faster than float16 here); the
packed layers are float16 either way and the artifact is saved in float16, as AWQ kernels
expect.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwrap.workers import protocol as p
from qwrap.workers.runtime import (
    LayerMeter,
    WorkerError,
    check_group_size,
    release_memory,
    resolve_device,
    run,
    versions,
)

if TYPE_CHECKING:
    from qwrap.workers.layerstore import LayerStore

CHECKPOINT_SUBDIR = "autoawq"


def main(job: p.QuantizeJob) -> None:
    p.emit(p.Started(task="quantize", backend="autoawq", pid=os.getpid(), device=job.device,
                     versions=versions("autoawq")))
    import torch

    from qwrap.workers import artifact, layerstore
    from qwrap.workers.calib import load_samples

    started = time.monotonic()
    device = resolve_device(job.device)
    model_dir = Path(job.model)
    model_type = _supported_model_type(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=job.trust_remote_code)
    samples = load_samples(job.calibration, tokenizer, model_dir)
    p.emit(p.Progress(stage="calibration", done=job.calibration.n_samples,
                      total=job.calibration.n_samples, unit="samples"))
    dtype = torch.float32 if device == "cpu" else torch.float16
    store = layerstore.LayerStore(
        Path(job.checkpoint_dir) / CHECKPOINT_SUBDIR if job.checkpoint_dir else None,
        layerstore.fingerprint(backend="autoawq", versions=versions("autoawq"), dtype=str(dtype),
                               settings=_quant_config(job), calibration=samples.metadata["ids_sha256"],
                               source=layerstore.source_fingerprint(model_dir)),
    )
    model = _load(model_dir, dtype, trust=job.trust_remote_code)
    check_group_size(model.model, job.group_size)
    p.emit(p.Progress(stage="load", done=1, total=1, unit="model"))
    model.quantize(
        tokenizer,
        quant_config=_quant_config(job),
        calib_data=samples.as_lists(),
        max_calib_samples=job.calibration.n_samples,
        max_calib_seq_len=job.calibration.seq_len,
        quantizer_cls=_quantizer_class(),
        store=store,
        meter=LayerMeter(cuda=device == "cuda"),
    )
    out = Path(job.output_dir)
    _save(model, model_dir, out)
    metadata = {"format": "awq", "backend": "autoawq", "model_type": model_type,
                "quantization": _quant_config(job), "calibration": samples.metadata,
                "versions": versions("autoawq")}
    artifact.write_metadata(out, metadata)
    artifact.check_complete(out)
    p.emit(p.Result(output_dir=str(out), files=artifact.list_files(out),
                    metadata={**metadata, "device": device, "calibration_cache_hit": samples.cache_hit,
                              "seconds": round(time.monotonic() - started, 3)}))


def _quant_config(job: p.QuantizeJob) -> dict[str, Any]:
    return {"w_bit": job.bits, "q_group_size": job.group_size, "zero_point": job.zero_point,
            "version": job.version.upper()}


def _supported_model_type(model_dir: Path) -> str:
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP

    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    if model_type not in AWQ_CAUSAL_LM_MODEL_MAP:
        raise WorkerError("unsupported", f"autoawq does not support model type {model_type!r}",
                          hint="Try --backend gptqmodel.")
    return str(model_type)


def _load(model_dir: Path, dtype: Any, *, trust: bool) -> Any:
    from awq import AutoAWQForCausalLM

    return AutoAWQForCausalLM.from_pretrained(
        str(model_dir), torch_dtype=dtype, device_map="cpu", trust_remote_code=trust,
    )


def _save(model: Any, model_dir: Path, out: Path) -> None:
    import torch

    from qwrap.workers import artifact

    source = json.loads((model_dir / "config.json").read_text())
    model.model.config.use_cache = source.get("use_cache", True)  # AutoAWQ loads with False
    model.model.to(torch.float16)
    model.model.config.dtype = torch.float16
    artifact.sort_buffers(model.model)
    model.save_quantized(str(out))
    artifact.use_source_files(model_dir, out)


def _quantizer_class() -> type:
    """Built on demand: its base class only exists once awq is importable."""
    import torch
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.module import get_op_name

    class CheckpointingQuantizer(AwqQuantizer):
        def __init__(self, *args: Any, store: LayerStore, meter: LayerMeter, **kwargs: Any) -> None:
            self.store = store
            self.meter = meter
            self.index = -1
            self.restored: tuple[list[Any], list[Any]] | None = None
            self.scales: list[Any] = []
            self.clips: list[Any] = []
            super().__init__(*args, **kwargs)

        def _get_input_feat(self, layer: Any, named_linears: Any) -> Any:
            # Called once per layer, first thing: the layer boundary.
            self.index = next(i for i, m in enumerate(self.modules) if m is layer)
            self.meter.start()
            p.emit(p.LayerStarted(index=self.index, total=len(self.modules)))
            saved = self.store.load(self.index)
            self.restored = _decode(saved) if saved is not None else None
            self.scales, self.clips = [], []
            return super()._get_input_feat(layer, named_linears)

        def _search_best_scale(self, module: Any, prev_op: Any, layers: Any, inp: Any,
                               module2inspect: Any = None, kwargs: Any = None) -> Any:
            kwargs = {} if kwargs is None else kwargs
            if self.restored is None:
                found = _search_restoring(super()._search_best_scale, module, prev_op, layers, inp,
                                          module2inspect, kwargs)
                self.scales.append(found)
                return found
            kwargs.pop("use_cache", None)  # the search's side effect on the shared kwargs
            found = self.restored[0][len(self.scales)]
            expected = (get_op_name(module, prev_op), tuple(get_op_name(module, m) for m in layers))
            if found[:2] != expected:
                raise RuntimeError(f"checkpoint of layer {self.index} does not match {expected}")
            self.scales.append(found)
            return found

        def _search_best_clip(self, layer: Any, named_linears: Any, input_feat: Any) -> Any:
            if self.restored is None:
                self.clips = super()._search_best_clip(layer, named_linears, input_feat)
            else:
                self.clips = self.restored[1]
            return self.clips

        def _apply_quant(self, module: Any, named_linears: Any) -> None:
            resumed = self.restored is not None
            if not resumed:
                path = self.store.save(self.index, *_encode(self.scales, self.clips))
                if path is not None:
                    p.emit(p.CheckpointSaved(index=self.index, path=str(path)))
            super()._apply_quant(module, named_linears)
            release_memory(self.meter.cuda)  # AutoAWQ's own clear_memory() is a no-op
            p.emit(self.meter.stop(self.index, len(self.modules), resumed=resumed))

    def _search_restoring(search: Any, module: Any, prev_op: Any, layers: Any, inp: Any,
                          module2inspect: Any, kwargs: Any) -> Any:
        # AutoAWQ snapshots the weights it tries scales on with `v.cpu()`, which on CPU is
        # the live tensor itself: its first in-place trial scaling leaks into the "restored"
        # weights (on CUDA `.cpu()` copies, so GPU runs are unaffected). A real copy, put
        # back after the search, makes the search side-effect free as intended.
        target = module2inspect if module2inspect is not None else layers[0]
        snapshot = {k: v.detach().clone() for k, v in target.state_dict().items()}
        found = search(module, prev_op, layers, inp, module2inspect, kwargs)
        target.load_state_dict(snapshot)
        return found

    def _encode(scales: list[Any], clips: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors = {f"scale.{i}": s[2] for i, s in enumerate(scales)}
        tensors.update({f"clip.{i}": c[1].to("cpu") for i, c in enumerate(clips)})
        state = {"scales": [[s[0], list(s[1])] for s in scales], "clips": [c[0] for c in clips]}
        return tensors, state

    def _decode(saved: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> tuple[list[Any], list[Any]]:
        tensors, state = saved
        scales = [(prev, tuple(names), tensors[f"scale.{i}"])
                  for i, (prev, names) in enumerate(state["scales"])]
        clips = [(name, tensors[f"clip.{i}"]) for i, name in enumerate(state["clips"])]
        return scales, clips

    return CheckpointingQuantizer


if __name__ == "__main__":
    run(p.QuantizeJob, main, backend="autoawq")
