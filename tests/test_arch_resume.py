"""Resume at the next layer beyond GPTQModel's own model-type list: a dense Qwen3 (GPTQ) and a
Mixtral-style mixture of experts (AWQ), both through gptqmodel, are SIGKILLed once a layer's
checkpoint is committed, and the same command again restores that layer and makes the folder
an uninterrupted run makes, byte for byte. A model definition that runs its own code between
layers is not resumed, and the worker's warning says which and why."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qwrap.envs import find_env
from qwrap.toolchain import cache_root
from test_arch_models import qwen3_bpe

pytestmark = [pytest.mark.slow, pytest.mark.backend]

ARGS = ("--calib-samples", "8", "--calib-seq-len", "64", "--no-eval", "--json")

# A Mixtral layout (4 experts, 2 active) with the tiny Qwen3's BPE tokenizer: run with the
# gptqmodel environment's Python, given that model's folder.
BUILD_MIXTRAL = r"""
import sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM
tokenizer, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(tokenizer)
torch.manual_seed(0)
config = MixtralConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_local_experts=4,
                       num_experts_per_tok=2, tie_word_embeddings=True, max_position_embeddings=2048,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
"""


def mixtral() -> Path:
    tokenizer = qwen3_bpe()
    key = hashlib.sha256(BUILD_MIXTRAL.encode() + (tokenizer / "tokenizer.json").read_bytes()).hexdigest()[:16]
    final = cache_root() / "test-models" / f"bpe-mixtral-{key}" / "tiny-mixtral"
    if not final.is_dir():
        tmp = final.with_name(f".building-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([str(find_env("gptqmodel").python), "-c", BUILD_MIXTRAL, str(tokenizer), str(tmp)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        try:
            tmp.rename(final)
        except OSError:  # built at the same time elsewhere
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _killed_then_resumed(model: Path, fmt: str, corpus: Path, tmp_path: Path) -> tuple[dict, dict, str]:
    """The reference artifact, the resumed artifact and the resumed run's journal."""
    from conftest import qwrap_argv, run_qwrap
    from moments import running_child, wait_for

    calib = tmp_path / "calib.txt"
    calib.write_text(corpus.read_text()[:60000])
    args = ["-f", fmt, "--calib", str(calib), *ARGS]
    reference = run_qwrap("run", str(model), "-o", str(tmp_path / "ref"), *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (art,) = json.loads(reference.stdout)["artifacts"]
    out = tmp_path / "o"
    proc = subprocess.Popen(qwrap_argv("run", str(model), "-o", str(out), *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    worker = running_child(out, f"{fmt}.quantize", proc, timeout=600)
    wait_for(out, "file:.checkpoint/layers/*/gptqmodel/CURRENT", proc, timeout=600)  # a layer committed
    worker.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    resumed = run_qwrap("run", str(model), "-o", str(out), *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / ".checkpoint" / "logs" / f"{fmt}.quantize.log").read_text()
    assert "resuming from gptqmodel checkpoint: layers 0-" in log and "restarts from the first layer" not in log
    (again,) = json.loads(resumed.stdout)["artifacts"]
    return art, again, (out / ".checkpoint" / "journal.jsonl").read_text()


def _assert_resumed_identically(art: dict, again: dict, journal: str) -> None:
    restored = [int(n) for n in re.findall(r'"resumed_layers": (\d+)', journal)]
    assert restored and max(restored) >= 1, "no layer was restored from its checkpoint"
    assert _tree(Path(again["path"])) == _tree(Path(art["path"]))


def test_a_dense_qwen3_gptq_run_killed_mid_run_resumes_at_the_next_layer(corpus: Path, tmp_path: Path) -> None:
    art, again, journal = _killed_then_resumed(qwen3_bpe(), "gptq", corpus, tmp_path)
    _assert_resumed_identically(art, again, journal)


def test_a_mixtral_awq_run_killed_mid_run_resumes_at_the_next_layer(corpus: Path, tmp_path: Path) -> None:
    art, again, journal = _killed_then_resumed(mixtral(), "awq", corpus, tmp_path)
    _assert_resumed_identically(art, again, journal)
    header = (Path(art["path"]) / "model.safetensors").read_bytes()
    names = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])
    expert = re.compile(r"model\.layers\.(\d)\.mlp\.experts\.(\d)\.\w+\.qweight")
    experts = {m.groups() for m in map(expert.fullmatch, names) if m}
    assert len(experts) == 2 * 4  # every expert of both layers quantized


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
