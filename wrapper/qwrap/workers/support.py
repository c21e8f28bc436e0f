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
  says so and passes.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import defaultdict
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
        layer = cls.get_model_layers(model)[0]
        cls.get_layers_for_scaling(layer, defaultdict(lambda: None), {})
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        return {"ok": False, "reason": f"autoawq's {cls.__name__} cannot walk this transformers "
                                       f"{type(model).__name__}: {type(exc).__name__}: {exc}"}
    return {"ok": True, "reason": f"autoawq's {cls.__name__} walks its layers"}


def main(argv: list[str]) -> None:
    backend = argv[0]
    found: dict[str, Any] = {"backend": backend, "model_types": model_types(backend)}
    if len(argv) > 1:
        found["probe"] = probe(backend, Path(argv[1]))
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
