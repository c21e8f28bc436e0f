"""Which backend can quantize which architecture, as the backend itself says (its own model
table, and its own layer walk on a weightless skeleton of the model), checked in `plan` before
any weights are loaded: the failures autoawq met after loading a Mixtral or a Qwen3-MoE model
are refusals up front that name the backend that can."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import run_qwrap
from qwrap.support import PROBES_DIR, TABLE_FILE, model_types, support
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.backend

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 4096, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 256,
                "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 4096, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256,
                  "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 4096,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                  "head_dim": 64},
    "gemma3_text": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 256,
                    "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 4096, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 64},
    # DeepSeek-V3's layout: low-rank q and kv (MLA), a dense first layer, then routed experts
    # beside a shared one (other widths than the architecture matrix's model)
    "deepseek_v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 256,
                    "intermediate_size": 512, "moe_intermediate_size": 64, "num_hidden_layers": 3, "vocab_size": 4096,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "first_k_dense_replace": 1,
                    "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
                    "qk_rope_head_dim": 16, "v_head_dim": 32, "rope_scaling": None},
}


def config_file(tmp_path: Path, name: str) -> tuple[dict[str, Any], Path]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
    return CONFIGS[name], folder / "config.json"


def test_the_tables_are_the_backends_own(toolchain: Toolchain) -> None:
    awq, gptq = model_types("autoawq"), model_types("gptqmodel")
    assert {"llama", "mixtral", "qwen3_moe"} <= awq and "gemma3_text" not in awq
    assert {"llama", "mixtral", "qwen3_moe", "gemma3_text", "deepseek_v3"} <= gptq
    assert len(gptq) > len(awq) > 20  # read from the packages, not a list of ours


@pytest.mark.parametrize(("name", "ok", "words"), [
    ("llama", True, "walks its layers"),
    ("mixtral", False, "'MixtralDecoderLayer' object has no attribute 'block_sparse_moe'"),
    ("qwen3_moe", False, "'Qwen3MoeExperts' object is not iterable"),
    ("gemma3_text", False, "autoawq's model table has no 'gemma3_text'"),
    ("deepseek_v3", False, "KeyError: 'self_attn.q_proj'"),  # its class walks a q_proj; MLA has q_a/q_b
])
def test_autoawq_is_probed_on_the_models_skeleton(tmp_path: Path, toolchain: Toolchain, name: str, ok: bool,
                                                  words: str) -> None:
    config, path = config_file(tmp_path, name)
    found = support("autoawq", config, path, "awq")
    assert found is not None and found.ok is ok and words in found.reason, found


def test_awq_on_gptqmodel_is_probed_on_its_scaling_groups(tmp_path: Path, toolchain: Toolchain) -> None:
    """GPTQModel's AWQ scaling groups of each kind of layer, on a skeleton converted as its
    loader converts it: DeepSeek-V3's shared experts come after the routed ones with no module
    to inspect (its scale search asserts there after loading the model) -- refused for AWQ, not
    for GPTQ; Mixtral's and Qwen3-MoE's groups pass."""
    config, path = config_file(tmp_path, "deepseek_v3")
    awq, gptq = support("gptqmodel", config, path, "awq"), support("gptqmodel", config, path, "gptq")
    assert awq is not None and not awq.ok, awq
    assert "['mlp.shared_experts.gate_proj', 'mlp.shared_experts.up_proj'] of layer 1" in awq.reason, awq
    assert gptq is not None and gptq.ok, gptq
    for name in ("mixtral", "qwen3_moe", "llama"):
        config, path = config_file(tmp_path, name)
        found = support("gptqmodel", config, path, "awq")
        assert found is not None and found.ok and "scaling groups checked on each kind of layer (1)" in found.reason


def test_tables_and_probes_are_kept_beside_the_environment(tmp_path: Path, toolchain: Toolchain) -> None:
    from qwrap.envs import find_env

    config, path = config_file(tmp_path, "mixtral")
    support("autoawq", config, path, "awq")
    env = find_env("autoawq").path
    assert (env / TABLE_FILE).is_file() and any((env / PROBES_DIR).iterdir())
    found = support("gptqmodel", config, path, "gptq")
    assert found is not None and found.ok and found.probe_ok is True


def test_plan_refuses_an_unsupported_pair_naming_the_backend_that_can(tmp_path: Path, toolchain: Toolchain,
                                                                      tiny_model: Path) -> None:
    """A Mixtral for AWQ with autoawq: refused in plan (exit 6), before anything is loaded,
    with the backend that can; the default backend (gptqmodel) plans it."""
    model = tmp_path / "mixtral"
    model.mkdir()
    for f in tiny_model.iterdir():  # the tiny model's weights' headers are read for sizes only
        if f.is_file():
            (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**CONFIGS["mixtral"], "hidden_size": 256}))
    planned = run_qwrap("plan", str(model), "-f", "awq", "--backend", "autoawq", "-o", str(tmp_path / "o"),
                        "--calib", str(tiny_model / "config.json"))
    assert planned.returncode == 0, planned.stderr  # plan shows every check
    assert "FAIL backend support: autoawq cannot quantize this mixtral model for AWQ (--backend gptqmodel can)" \
        in " ".join(planned.stdout.split())
    refused = run_qwrap("run", str(model), "-f", "awq", "--backend", "autoawq", "-o", str(tmp_path / "o"),
                        "--calib", str(tiny_model / "config.json"))
    assert refused.returncode == 6, refused.stderr
    assert "block_sparse_moe" in refused.stderr and "Use --backend gptqmodel" in refused.stderr
    assert "or --format gptq (--backend gptqmodel), or GGUF (--format gguf)." in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "o" / ".checkpoint").exists()  # before any work
    default = run_qwrap("plan", str(model), "-f", "awq", "-o", str(tmp_path / "o2"), "--calib",
                        str(tiny_model / "config.json"))
    assert "ok   backend support: gptqmodel can quantize mixtral" in default.stdout, default.stdout


def header_only_model(folder: Path, config: dict[str, Any], shapes: dict[str, list[int]]) -> Path:
    """A model folder whose weights are a safetensors header over a hole: what `plan` reads."""
    import struct

    folder.mkdir(parents=True)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_group_size_is_checked_on_the_weights_shapes(tmp_path: Path, toolchain: Toolchain, corpus: Path) -> None:
    """An MLA model's low-rank projections are narrower than its hidden and intermediate sizes:
    plan reads the input widths from the weights' headers and refuses the group size there,
    naming the tensor, instead of the quantize step failing after the model is loaded."""
    hidden, lora = 256, 96
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [512, hidden], "lm_head.weight": [512, hidden],
                                    "model.norm.weight": [hidden]}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {f"{p}self_attn.q_proj.weight": [4 * 64, hidden],
                   f"{p}self_attn.kv_a_proj_with_mqa.weight": [lora + 32, hidden],
                   f"{p}self_attn.kv_a_layernorm.weight": [lora],
                   f"{p}self_attn.kv_b_proj.weight": [4 * 96, lora],
                   f"{p}self_attn.o_proj.weight": [hidden, 4 * 64],
                   f"{p}mlp.gate_proj.weight": [512, hidden], f"{p}mlp.up_proj.weight": [512, hidden],
                   f"{p}mlp.down_proj.weight": [hidden, 512],
                   f"{p}input_layernorm.weight": [hidden], f"{p}post_attention_layernorm.weight": [hidden]}
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
              "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 512, "num_attention_heads": 4,
              "kv_lora_rank": lora, "q_lora_rank": None, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
              "v_head_dim": 64, "n_routed_experts": None, "first_k_dense_replace": 2}
    model = header_only_model(tmp_path / "mla", config, shapes)
    planned = run_qwrap("plan", str(model), "-f", "gptq", "-o", str(tmp_path / "o"), "--calib", str(corpus))
    assert planned.returncode == 0, planned.stderr
    shown = " ".join(planned.stdout.split())
    assert ("FAIL group size: --group-size 128 does not divide the input width 96 of "
            "model.layers.0.self_attn.kv_b_proj.weight") in shown, shown
    refused = run_qwrap("run", str(model), "-f", "gptq", "-o", str(tmp_path / "o"), "--calib", str(corpus))
    assert refused.returncode == 2 and "e.g. 32" in refused.stderr, refused.stderr
    fits = run_qwrap("plan", str(model), "-f", "gptq", "--group-size", "32", "-o", str(tmp_path / "o"),
                     "--calib", str(corpus))
    assert "ok   group size: 32 divides the layer input widths [96, 256, 512]" in fits.stdout, fits.stdout
