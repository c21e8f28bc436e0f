"""Resume at the next layer beyond GPTQModel's own model-type list: which of GPTQModel's model
definitions qwrap lets resume, and the worker's warning for one it does not (a definition
that runs its own code between layers). The kill-and-resume runs themselves (a dense Qwen3
through GPTQ, a Mixtral through AWQ) are in test_arch_models.py, beside the uninterrupted
runs they are compared with."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from qwrap.envs import find_env

pytestmark = [pytest.mark.slow, pytest.mark.backend]

# In the gptqmodel environment: the decision and the worker's warning for GPTQModel's own
# definitions, without loading weights (a definition instance with just a config).
CHECK_DEFINITIONS = r"""
import json, sys
from types import SimpleNamespace
import torch
from gptqmodel.models.auto import MODEL_MAP
from qwrap.workers import gptqmodel_common as common
from qwrap.workers import protocol as p
warnings = []
common.warn = warnings.append
decisions = {}
for model_type in sys.argv[1:]:
    definition = MODEL_MAP[model_type]
    decisions[model_type] = common.resume_refusal(definition, model_type)
    model = definition.__new__(definition)
    torch.nn.Module.__init__(model)
    model.model = SimpleNamespace(config=SimpleNamespace(model_type=model_type), modules=lambda: iter(()))
    job = p.QuantizeJob(backend="gptqmodel", format="gptq", model="m", output_dir="o",
                        calibration=None, checkpoint_dir="ckpt")
    decisions[model_type + ":config"] = common._checkpoint_config(job, model) is not None
print(json.dumps({"decisions": decisions, "warnings": warnings}))
"""


def test_a_definition_with_its_own_code_between_layers_restarts_with_a_warning_saying_why() -> None:
    from qwrap.envs import worker_code

    proc = subprocess.run([str(find_env("gptqmodel").python), "-c", CHECK_DEFINITIONS, "gemma3n_text", "hymba",
                           "qwen3", "mixtral", "gemma3_text", "llama"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(worker_code())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    decisions, warnings = found["decisions"], found["warnings"]
    for admitted in ("qwen3", "mixtral", "gemma3_text", "llama"):
        assert decisions[admitted] is None and decisions[admitted + ":config"] is True, admitted
    assert "prepare_layer_replay_kwargs" in decisions["gemma3n_text"]
    assert "key/value" in decisions["hymba"]
    assert not decisions["gemma3n_text:config"] and not decisions["hymba:config"]
    (gemma3n, hymba) = warnings
    assert gemma3n.startswith("gptqmodel cannot resume gemma3n_text at a layer: ")
    assert "Gemma3nTextQModel" in gemma3n and "prepare_layer_replay_kwargs" in gemma3n
    assert "restarts from the first layer" in gemma3n and hymba.startswith("gptqmodel cannot resume hymba")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
