"""scripts/make-tiny-model: deterministic offline model folders the pinned converter accepts.

The slow tests need the converter environment's Python in $QWRAP_CONVERT_PYTHON and the
pinned llama.cpp source (`qwrap setup`); they skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from background import Lane, fixture_or_outcome, lane, needing, selected
from conftest import _missing
from qwrap.errors import ToolchainMissingError
from qwrap.toolchain import Toolchain, find_toolchain, read_pin, source_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make-tiny-model"
# For each folder named (one process: torch and transformers are imported once), one line:
# tokenizer size, vocabulary size, tokens generated; or the error.
LOAD_AND_GENERATE = """
import sys, traceback
from transformers import AutoModelForCausalLM, AutoTokenizer
for folder in sys.argv[1:]:
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = tok("The harbour was quiet before the storm.", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        print(len(tok), model.config.vocab_size, out.shape[1] - ids["input_ids"].shape[1], flush=True)
    except Exception:
        print("error", traceback.format_exc()[-2000:].replace("\\n", " | "), flush=True)
"""
# Mean next-token loss of each model on the corpus tail make-tiny-model holds out of training,
# in BOS-led windows as in training and in llama-perplexity's chunks.
HELD_OUT_LOSS = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
text = open(sys.argv[1], encoding="utf-8").read()
for folder in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tail = ids[len(ids) * 95 // 100:]
    windows = torch.tensor([[tok.bos_token_id, *tail[i:i + 127]]
                            for i in range(0, len(tail) - 127, 127)])
    with torch.no_grad():
        print(model(input_ids=windows, labels=windows).loss.item())
"""
QUANT_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


@pytest.fixture(scope="module")
def python() -> Path:
    value = os.environ.get("QWRAP_CONVERT_PYTHON")
    if not value:
        _missing("QWRAP_CONVERT_PYTHON", "point it at the converter environment's python: "
                 "torch, transformers, tokenizers, sentencepiece, safetensors")
    return Path(str(value))


@pytest.fixture(scope="module")
def converter() -> Path:
    script = source_dir(read_pin()) / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    try:
        return find_toolchain().converter
    except ToolchainMissingError:
        _missing("the pinned llama.cpp source", f"no {script}; run `qwrap setup`")
        raise


def build(python: Path, out: Path, *args: str) -> Path:
    proc = subprocess.run([str(python), str(SCRIPT), str(out), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def convert(python: Path, converter: Path, model: Path, gguf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), str(converter), str(model), "--outfile", str(gguf),
                           "--outtype", "f16"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def models(tiny_model: Path, named_model: Callable[[str], Path]) -> dict[str, Path]:
    """One folder per case, each built once per machine (conftest.MODELS); "spm" is the
    default tiny model every other test uses."""
    return {"spm": tiny_model, **{name: named_model(name) for name in ("llama-bpe", "gpt2-bpe", "qwen2-sharded", "foo")}}


@pytest.fixture(scope="module")
def work(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lane]:
    """The module's child processes (builds, conversions, torch scripts, the llama.cpp ladder),
    started together on a lane of two (background.py): each runs one thread for seconds (mostly
    importing torch). A test waits for what it asserts on."""
    tmp = tmp_path_factory.mktemp("work")
    names = selected(request)

    def job(fn: Callable[..., Any], *fixtures: str) -> Callable[..., Any]:
        return needing([fixture_or_outcome(request, f) for f in fixtures], fn)

    with lane(tmp, workers=2) as on:
        # in the order the tests read them
        if "test_same_arguments_give_identical_bytes" in names:
            on.start(("again",), job(lambda python: build(python, tmp / "again"), "python"))
        if names & {"test_converter_accepts", "test_converter_rejects"}:
            convert_job = job(lambda python, converter, models, name: convert(python, converter, models[name],
                                                                              tmp / f"{name}.gguf"),
                              "python", "converter", "models")
            for name in ("spm", "llama-bpe", "qwen2-sharded", "gpt2-bpe", "foo"):
                on.start(("convert", name), convert_job, name)
        if "test_transformers_loads_and_generates" in names:
            on.start(("generated",), job(_generated, "python", "models"))
        if "test_training_is_deterministic" in names:
            for name in ("a", "b"):
                on.start(("trained", name), job(lambda python, name: _train(python, tmp / name), "python"), name)
        if "test_trained_model_has_learned_the_corpus" in names:
            on.start(("held-out",), job(_held_out_loss, "python", "trained_model", "models", "corpus"))
        if "test_trained_model_gives_a_quantization_ladder" in names:
            on.start(("ladder",), job(_ladder, "python", "converter", "trained_model", "toolchain", "corpus"),
                     tmp / "ladder")
        yield on


# -- no toolchain needed -----------------------------------------------------------------


def test_help_needs_no_heavy_imports() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--tokenizer {spm,llama-bpe,gpt2-bpe}" in proc.stdout and "pre-tokenizer" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--heads", "3"), "not a multiple of --heads"),
    (("--kv-heads", "3"), "not a multiple of --kv-heads"),
    (("--vocab", "100"), "--vocab must be at least"),
    (("--shards", "999"), "exceeds the number of tensors"),
])
def test_bad_sizes_refused_before_any_work(tmp_path: Path, args: tuple[str, ...],
                                           message: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "m"), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr
    assert not any(tmp_path.iterdir())


# -- with the converter environment ------------------------------------------------------


@pytest.mark.slow
def test_same_arguments_give_identical_bytes(work: Lane, models: dict[str, Path]) -> None:
    again: Path = work.result("again")  # built again with the default arguments
    assert contents(again) == contents(models["spm"])
    assert not again.with_name("again.partial").exists()


@pytest.mark.slow
def test_folder_is_complete(models: dict[str, Path]) -> None:
    spm = models["spm"]
    assert sorted(p.name for p in spm.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((spm / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 4096
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert not (models["llama-bpe"] / "tokenizer.model").exists()
    sharded = models["qwen2-sharded"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    foo = json.loads((models["foo"] / "config.json").read_text())
    assert foo["architectures"] == ["FooForCausalLM"] and foo["model_type"] == "llama"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spm", "llama-bpe", "qwen2-sharded"])
def test_converter_accepts(work: Lane, name: str) -> None:
    proc: subprocess.CompletedProcess[str] = work.result("convert", name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.args[4]).read_bytes()[:4] == b"GGUF"  # --outfile


@pytest.mark.slow
@pytest.mark.parametrize(("name", "message"), [
    ("gpt2-bpe", "pre-tokenizer was not recognized"),
    ("foo", "Model FooForCausalLM is not supported"),
])
def test_converter_rejects(work: Lane, name: str, message: str) -> None:
    proc: subprocess.CompletedProcess[str] = work.result("convert", name)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]


GENERATED = ("spm", "llama-bpe", "qwen2-sharded")


def _generated(python: Path, models: dict[str, Path]) -> dict[str, str]:
    """What LOAD_AND_GENERATE printed for each of GENERATED, by name."""
    proc = subprocess.run([str(python), "-c", LOAD_AND_GENERATE, *(str(models[name]) for name in GENERATED)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(GENERATED), proc.stdout + proc.stderr[-3000:]
    return dict(zip(GENERATED, lines, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATED)
def test_transformers_loads_and_generates(work: Lane, name: str) -> None:
    line = work.result("generated")[name]
    assert not line.startswith("error"), line
    tokenizer_size, vocab_size, count = map(int, line.split())
    assert (tokenizer_size, vocab_size, count) == (4096, 4096, 4)


# -- --train-steps ---------------------------------------------------------------------------


def _train(python: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    proc = subprocess.run([str(python), str(SCRIPT), str(out), "--train-steps", "5"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    return proc, out


@pytest.mark.slow
def test_training_is_deterministic(work: Lane, models: dict[str, Path]) -> None:
    runs = []
    for name in ("a", "b"):  # two separate processes
        proc, folder = work.result("trained", name)
        assert proc.returncode == 0, proc.stderr
        assert "training loss" in proc.stderr and "held-out loss" in proc.stderr, proc.stderr
        runs.append(contents(folder))
    assert runs[0] == runs[1]
    random = contents(models["spm"])
    assert runs[0]["model.safetensors"] != random["model.safetensors"]
    assert {k: v for k, v in runs[0].items() if k != "model.safetensors"} == {
        k: v for k, v in random.items() if k != "model.safetensors"}


def _held_out_loss(python: Path, trained_model: Path, models: dict[str, Path],
                   corpus: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", HELD_OUT_LOSS, str(corpus), str(trained_model), str(models["spm"])],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.slow
def test_trained_model_has_learned_the_corpus(work: Lane) -> None:
    proc: subprocess.CompletedProcess[str] = work.result("held-out")  # the trained model, then the random one
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, random = map(float, proc.stdout.split())
    # ln(4096) = 8.32 is a uniform guess; the trained model reaches ~4.4 on text it never saw.
    assert random > 8.0 and trained < 5.0, (trained, random)


def _perplexity(toolchain: Toolchain, pattern: str, *args: str) -> float:
    """The figure `pattern` matches in llama-perplexity's output. The pinned llama.cpp prints
    through a logger thread it never joins (common/log.cpp, llama.cpp issue 22142), so on a
    busy machine the last lines, the summary included, are sometimes lost at exit: retry."""
    for _ in range(3):
        proc = subprocess.run([str(toolchain.tool("llama-perplexity")), "-c", "256", "--chunks",
                               "8", "-t", "1", "-b", "256", *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        match = re.search(pattern, proc.stdout + proc.stderr, re.MULTILINE)
        if match:
            return float(match.group(1))
    raise AssertionError(f"no {pattern!r} in llama-perplexity output:\n{proc.stdout[-3000:]}")


def _ladder(python: Path, converter: Path, trained_model: Path, toolchain: Toolchain, corpus: Path,
            tmp_path: Path) -> tuple[float, dict[str, float]]:
    """The trained model converted by hand to bf16, its perplexity, and the KLD of each type of
    QUANT_LADDER against it."""
    tmp_path.mkdir()
    sixteen = tmp_path / "bf16.gguf"
    proc = subprocess.run([str(python), str(converter), str(trained_model), "--outfile",
                           str(sixteen), "--outtype", "bf16"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = tmp_path / "base.kld"
    ppl = _perplexity(toolchain, r"Final estimate: PPL = ([0-9.]+)", "-m", str(sixteen),
                      "-f", str(corpus), "--kl-divergence-base", str(base))
    kld = {}
    for qtype in QUANT_LADDER:
        gguf = tmp_path / f"{qtype}.gguf"
        quantize = subprocess.run([str(toolchain.tool("llama-quantize")), str(sixteen), str(gguf),
                                   qtype, "1"],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=300)
        assert quantize.returncode == 0, quantize.stderr[-3000:]
        kld[qtype] = _perplexity(toolchain, r"^Mean\s+KLD:\s+([0-9.]+)", "-m", str(gguf),
                                 "--kl-divergence-base", str(base), "--kl-divergence")
    return ppl, kld


@pytest.mark.slow
def test_trained_model_gives_a_quantization_ladder(work: Lane) -> None:
    ppl, kld = work.result("ladder")
    assert ppl < 200, ppl  # vocabulary 4096: random weights give ~4200
    figures = [kld[qtype] for qtype in QUANT_LADDER]
    assert figures == sorted(figures) and len(set(figures)) == len(figures), kld
