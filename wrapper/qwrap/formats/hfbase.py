"""What AWQ and GPTQ declare alike besides their common options (hfoptions.py): their checks
without a model, what they need installed, and their rows in the plan, the result, the model
card and `qwrap formats`. This (with hfoptions.py) is all that `qwrap --help` loads of them; the
code that runs (model checks, steps and estimates, actions) is in hfquant.py, loaded by the
entry points at the end. awq.py and gptq.py add their own options and worker-job fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailableError, UsageError
from ..options import Listing
from ..workers.backends import BITS, VALIDATE_BACKEND, WORKER_MODULES
from .hfoptions import Common

if TYPE_CHECKING:
    from ..checks import Check
    from ..context import Inputs, StepContext, StepOutcome
    from ..model import ModelInfo
    from ..plan import Plan, PlanBuilder, Step

PANEL = "AWQ and GPTQ"
DEVICES = ("auto", "cpu", "cuda")
LIBRARY = "transformers"


def validate_common(o: Common, fmt: str) -> None:
    if o.bits not in BITS[fmt]:
        raise UsageError(f"{fmt.upper()} supports --bits {', '.join(map(str, BITS[fmt]))}, not {o.bits}")
    if o.group_size != -1 and o.group_size not in (32, 64, 128, 256, 512, 1024):
        raise UsageError(f"--group-size {o.group_size} is not supported", hint="Use 32, 64, 128 (default) or 256.")
    if o.device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}")
    if o.device == "cuda" and not gpu_present():
        raise BackendUnavailableError("--device cuda was given but this host has no NVIDIA GPU",
                                      hint="Use --device cpu (or auto).")
    if o.calib_samples < 1 or o.calib_seq_len < 16:
        raise UsageError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
    if (o.backend, fmt) not in WORKER_MODULES:
        raise UsageError(f"backend {o.backend} does not produce {fmt.upper()}")


def needs_calibration(o: Common) -> bool:
    return True


def wants_calibration(o: Common) -> bool:
    return True


def requirements(o: Common) -> tuple[str, ...]:
    return (o.backend, VALIDATE_BACKEND)  # validation reloads artifacts there


# -- rows ------------------------------------------------------------------------------


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


def listing(fmt: str, backends: tuple[str, ...]) -> Listing:
    rows = tuple((str(b), "128 (32-1024, must divide the layer widths)", ", ".join(backends)) for b in BITS[fmt])
    return Listing(("--bits", "--group-size", "--backend (default first)"), rows,
                   f"Artifact: a Hugging Face folder <model>-{fmt.upper()}-<bits>bit-g<group>, loadable by "
                   "transformers and vLLM.")


# -- entry points to the code that runs, loaded on first use (not by `qwrap --help`) ----------


def gpu_present() -> bool:
    """Whether this host has an NVIDIA GPU (toolchain.py: asked only when validating options)."""
    from ..toolchain import gpu_present as probe

    return probe()


def checks(o: Common, model: ModelInfo, *, thorough: bool) -> list[Check]:
    from .hfquant import checks as run

    return run(o, model, thorough=thorough)


def add_steps(b: PlanBuilder, o: Common, model: ModelInfo, *, fmt: str, own: Mapping[str, Any]) -> None:
    """``own``: the format's worker-job fields (e.g. AWQ's zero_point and version)."""
    from .hfquant import add_steps as add

    add(b, o, model, fmt=fmt, own=own)


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from .hfquant import execute as run

    return run(step, inputs, ctx)
