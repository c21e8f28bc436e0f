"""``python -m qwrap.workers.support BACKEND [CONFIG.json]``, in the backend's environment:
what the backend itself says it can quantize, as one JSON line on stdout.

- ``model_types``: the keys of the backend's own model table (autoawq's
  ``AWQ_CAUSAL_LM_MODEL_MAP``, GPTQModel's ``MODEL_MAP``, auto-gptq's
  ``GPTQ_CAUSAL_LM_MODEL_MAP``), read once per environment by the parent (support.py) and
  kept beside the environment;
- with a model's ``config.json``, ``probe``: the backend's own walk over the model's layers,
  run on a skeleton of that model on PyTorch's meta device (no weights, nothing loaded): a
  backend written for an older transformers fails here, with its own error, instead of after
  the model is loaded (autoawq's MoE classes look for ``block_sparse_moe``, which current
  transformers no longer has). Only autoawq walks layers this way; for the others the probe
  says so and passes. GPTQModel's AWQ groups a layer's projections by the scale each takes
  from the module before it (``awq_get_modules_for_scaling``): its groups, on a skeleton
  converted as GPTQModel's loader converts it (defuser: fused experts as per-expert modules),
  go under ``formats.awq``, and a group its scale search cannot take (several projections and
  no module to inspect: DeepSeek-V3's shared experts after the routed ones) is a refusal.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any


def model_types(backend: str) -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # some backends print banners on import
        if backend == "autoawq":
            from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP as table
        elif backend == "gptqmodel":
            from gptqmodel.models.auto import MODEL_MAP as table
        elif backend == "auto-gptq":
            from auto_gptq.modeling.auto import GPTQ_CAUSAL_LM_MODEL_MAP as table
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    return sorted(str(k) for k in table)


def probe(backend: str, config_path: Path) -> dict[str, Any]:
    """The backend's layer walk on a meta-device skeleton of the model."""
    if backend == "gptqmodel":
        return {"ok": True, "reason": "gptqmodel walks the model's modules by name when it quantizes",
                "formats": {"awq": _gptqmodel_awq_groups(config_path)}}
    if backend != "autoawq":
        return {"ok": True, "reason": f"{backend} walks the model's modules by name when it quantizes"}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=False)
    with contextlib.redirect_stdout(io.StringIO()):
        from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    cls = AWQ_CAUSAL_LM_MODEL_MAP.get(config.model_type)
    if cls is None:
        return {"ok": False, "reason": f"autoawq has no model class for {config.model_type!r}"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        for _, layer in _layer_kinds(cls.get_model_layers(model)):
            # the inputs autoawq captures: one per linear module of the layer, by its name
            features = {name: None for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            cls.get_layers_for_scaling(layer, features, {})
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        return {"ok": False, "reason": f"autoawq's {cls.__name__} cannot walk this transformers "
                                       f"{type(model).__name__}: {type(exc).__name__}: {exc}"}
    return {"ok": True, "reason": f"autoawq's {cls.__name__} walks its layers"}


def _layer_kinds(layers: Any) -> list[tuple[int, Any]]:
    """The first layer of each kind (the same modules by name and class): a dense first layer
    and the mixture-of-experts layers after it are two."""
    kinds: dict[tuple[str, ...], tuple[int, Any]] = {}
    for index, layer in enumerate(layers):
        kinds.setdefault(tuple(sorted(f"{name}:{type(m).__name__}" for name, m in layer.named_modules())), (index, layer))
    return list(kinds.values())


def _gptqmodel_awq_groups(config_path: Path) -> dict[str, Any]:
    """GPTQModel's AWQ scaling groups of each kind of layer of the model, on a meta-device
    skeleton as its loader converts it, filtered as its AWQ processor filters them (a group
    whose previous module's output does not match is skipped there); a group left with several
    projections and no module to inspect fails its scale search (``assert len(layers) == 1``).
    Anything else this cannot reproduce passes: the run then says what the backend says."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=False)
        with contextlib.redirect_stdout(io.StringIO()):
            import defuser
            from gptqmodel.models.auto import MODEL_MAP
        cls = MODEL_MAP[config.model_type]
        defuser.replace_fused_blocks(config.model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        defuser.convert_model(model, cleanup_original=True)
        definition = cls.__new__(cls)  # the definition's methods read only its class and the model
        definition.__dict__["model"] = model
        layers: Any = model
        for part in cls.module_tree:
            if part == "#":
                break
            layers = getattr(layers, part)
        kinds = _layer_kinds(layers)
        for index, layer in kinds:
            names = {id(m): name for name, m in layer.named_modules()}
            features = {name: torch.empty(1, 1, m.in_features, device="meta")
                        for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            for group in definition.awq_get_modules_for_scaling(layer, features, {}):
                members, prev = group["layers"], group["prev_op"]
                first = members[0] if members else None
                if (isinstance(prev, nn.Linear) and isinstance(first, nn.Linear) and prev is not first
                        and prev.weight.shape[0] != first.weight.shape[1]):
                    continue
                if group.get("module2inspect") is None and len(members) != 1:
                    return {"ok": False, "reason": f"gptqmodel's AWQ scales {[names.get(id(m)) for m in members]} of layer "
                                                   f"{index} together against {names.get(id(prev))}, with no module to "
                                                   "inspect: its scale search takes one projection there (it fails "
                                                   "`assert len(layers) == 1` after loading the model)"}
        return {"ok": True, "reason": f"gptqmodel's AWQ scaling groups checked on each kind of layer ({len(kinds)})"}
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run refuses nothing
        return {"ok": True, "reason": f"gptqmodel's AWQ groups not checked ({type(exc).__name__}: {exc})"}


def main(argv: list[str]) -> None:
    backend = argv[0]
    found: dict[str, Any] = {"backend": backend, "model_types": model_types(backend)}
    if len(argv) > 1:
        found["probe"] = probe(backend, Path(argv[1]))
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
