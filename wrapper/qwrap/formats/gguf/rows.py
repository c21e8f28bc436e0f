"""GGUF's rows: a deliverable's row in `plan` and its fields in the result, its usage in the
model card, its table in `qwrap formats`, and what makes an artifact unfit to push."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...options import Listing
from ...plan import Plan, Step
from .declaration import NAME
from .quants import ALIASES, QUANT_TYPES

WEIGHTS_UNAVAILABLE = ("not measured: the weights view runs where a CUDA GPU is present or with --eval-weights on, "
                       "and only when the dequantized copy fits in this machine's memory")


def plan_artifact(step: Step, plan: Plan) -> dict[str, Any]:
    if step.kind == "gguf.mmproj-validate":  # a vision model's projector, beside the text files
        return {"format": NAME, "quant": f"mmproj {str(step.param('mmproj_type')).upper()}",
                "name": Path(step.outputs[0]).name, "expected_bytes": step.estimate.output_bytes,
                "bits_per_weight": None, "projector": True}
    quant = step.param("quant")
    if step.param("target") is not None:  # a budget: its bytes are what the search will fill
        from .budgets import Target

        target = Target.from_key(step.param("target"))
        size = target.budget_bytes(plan.parameters) or step.estimate.output_bytes
        return {"format": NAME, "quant": quant, "name": Path(step.outputs[0]).name, "target": target.shown,
                "expected_bytes": size, "bits_per_weight": round(size * 8 / plan.parameters, 2) if plan.parameters else None}
    return {"format": NAME, "quant": quant, "name": Path(step.outputs[0]).name,
            "expected_bytes": step.estimate.output_bytes, "bits_per_weight": QUANT_TYPES[quant].bpw}


def result_fields(own: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]],
                  readers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    # a split set's step reads the measurements and the quantization as inputs; a single file's are its readers
    quantized = inputs.get("quantized", inputs.get("artifact", {}))
    # a budget's file was chosen by gguf.choose, which carries its measurement and the comparison
    chosen = quantized if "chosen" in quantized else None
    quality = readers.get("gguf.eval", inputs.get("quality", {})).get("quality")
    if quality is None and chosen is not None:
        quality = chosen.get("quality")
    if quality is not None:  # the weights view, scored in transformers (or why it is missing)
        weights = readers.get("gguf.weights", inputs.get("weights", {})).get("weights",
                                                                           {"unavailable": WEIGHTS_UNAVAILABLE})
        quality = {**quality, "weights": weights}
    fields = {"bits_per_weight": quantized.get("bits_per_weight"), "quality": quality, "calibration": None,
              # the per-tensor types asked for (--recipe, or a searched one) and what the tool could not give
              "recipe": quantized.get("recipe"), "fallbacks": list(quantized.get("fallbacks") or ()),
              "planned_bits_per_weight": quantized.get("planned_bits_per_weight"),
              "budget": _budget(chosen) if chosen is not None else None}
    if own.get("shards"):  # a split set: its total size; each shard's size and hash are listed
        fields |= {"shards": own["shards"], "bytes": sum(s["bytes"] for s in own["shards"]), "sha256": None}
    return fields


def _budget(chosen: Mapping[str, Any]) -> dict[str, Any]:
    """A budget's row: what was asked, what shipped and why, beside the stock file it was
    measured against (results.Budget)."""
    from .budgets import Target

    target = Target.from_key(chosen["target"])
    return {"target": target.shown, "budget_bytes": chosen.get("budget_bytes"),
            "kld_limit": target.value if target.kind == "kld" else None, "chosen": chosen["chosen"],
            "reason": chosen["reason"], "predicted_kld": chosen.get("predicted_kld"),
            "searched": chosen["searched"], "stock": chosen.get("stock")}


def publishable(path: Path) -> str | None:
    return None if path.is_file() else f"{path.name} is missing"


def card_usage(paths: list[str], *, chat: bool) -> str:
    name = paths[0]
    if chat:  # the source's chat template is in every file (tokenizer.chat_template): --jinja applies it
        return (f"llama.cpp (the chat template is in the file, `--jinja` applies it):\n\n```sh\n"
                f"llama-cli -m {name} --jinja -cnv\nllama-server -m {name} --jinja\n```")
    return f"llama.cpp:\n\n```sh\nllama-cli -m {name} -p \"Hello\"\nllama-server -m {name}\n```"


def projector_usage(model_file: str, mmproj_file: str) -> str:
    """How a vision model's text file and its projector are used together, for the model card."""
    return (f"llama.cpp, with images (the projector `{mmproj_file}` beside any of the text files):\n\n```sh\n"
            f"llama-mtmd-cli -m {model_file} --mmproj {mmproj_file} --image photo.jpg -p \"Describe the image.\"\n"
            f"llama-server -m {model_file} --mmproj {mmproj_file}\n```")


def listing() -> Listing:
    rows = tuple((q.name, f"{q.bpw:.2f}", "yes" if q.needs_imatrix else "", q.note) for q in QUANT_TYPES.values())
    return Listing(("type (--quant, case-insensitive)", "bits/weight", "needs --imatrix", "notes"), rows,
                   "Aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()))
