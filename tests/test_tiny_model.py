"""scripts/make-tiny-model: deterministic offline model folders the pinned converter accepts.

The slow tests need the converter environment (conftest's convert_python) and the pinned
llama.cpp source (`qwrap setup`); they skip with the reason otherwise (fail under make test)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from background import Lane, prefetch, prefetched
from conftest import _missing
from qwrap.errors import ToolchainMissingError
from qwrap.quality import PERPLEXITY_ATTEMPTS
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


def converter_script() -> Path:
    script = source_dir(read_pin()) / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    try:
        return find_toolchain().converter
    except ToolchainMissingError:
        _missing("the pinned llama.cpp source", f"no {script}; run `qwrap setup`")
        raise


def build(python: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    proc = subprocess.run([str(python), str(SCRIPT), str(out), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return out


def convert(python: Path, converter: Path, model: Path, gguf: Path,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), str(converter), str(model), "--outfile", str(gguf),
                           "--outtype", "f16"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, env=env)


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def models_of(tiny_model: Path, named_model: Callable[[str], Path]) -> dict[str, Path]:
    return {"spm": tiny_model, **{name: named_model(name) for name in ("llama-bpe", "gpt2-bpe", "qwen2-sharded", "foo")}}


@pytest.fixture(scope="module")
def models(tiny_model: Path, named_model: Callable[[str], Path]) -> dict[str, Path]:
    """One folder per case, each built once per machine (conftest.MODELS); "spm" is the
    default tiny model every other test uses."""
    return models_of(tiny_model, named_model)


# The module's child processes (builds, conversions, torch scripts, the llama.cpp ladder), as
# work on the session's lane (background.py), started in the order the tests read them: each
# runs one thread for seconds (mostly importing torch), done by the time this module, one of
# the last, runs. Each group's children run with the lane's environment.
CONVERTED = ("spm", "llama-bpe", "qwen2-sharded", "gpt2-bpe", "foo")


def _again(python: Path, on: Lane, root: Path) -> Path:
    return build(python, root / "again", env=on.env)  # built again with the default arguments


def _converted(python: Path, tiny_model: Path, named_model: Callable[[str], Path], on: Lane,
               root: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    models, script = models_of(tiny_model, named_model), converter_script()
    return {name: convert(python, script, models[name], root / f"{name}.gguf", env=on.env) for name in CONVERTED}


def _generated_all(python: Path, tiny_model: Path, named_model: Callable[[str], Path], on: Lane,
                   root: Path) -> dict[str, str]:
    return _generated(python, models_of(tiny_model, named_model), env=on.env)


def _trained(python: Path, on: Lane, root: Path) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    return {name: _train(python, root / name, env=on.env) for name in ("a", "b")}  # two separate processes


def _held_out(python: Path, trained_model: Path, tiny_model: Path, corpus: Path, on: Lane,
              root: Path) -> subprocess.CompletedProcess[str]:
    return _held_out_loss(python, trained_model, {"spm": tiny_model}, corpus, env=on.env)


def _ladder_of(python: Path, toolchain: Toolchain, trained_model: Path, corpus: Path, on: Lane,
               root: Path) -> tuple[float, dict[str, float]]:
    return _ladder(python, converter_script(), trained_model, toolchain, corpus, root / "ladder", env=on.env)


prefetch(__name__, "tiny.again", _again, ("convert_python",), tests=("test_same_arguments_give_identical_bytes",))
prefetch(__name__, "tiny.convert", _converted, ("convert_python", "tiny_model", "named_model"),
         tests=("test_converter_accepts", "test_converter_rejects"))
prefetch(__name__, "tiny.generated", _generated_all, ("convert_python", "tiny_model", "named_model"),
         tests=("test_transformers_loads_and_generates",))
prefetch(__name__, "tiny.trained", _trained, ("convert_python",), tests=("test_training_is_deterministic",))
prefetch(__name__, "tiny.held-out", _held_out, ("convert_python", "trained_model", "tiny_model", "corpus"),
         tests=("test_trained_model_has_learned_the_corpus",))
prefetch(__name__, "tiny.ladder", _ladder_of, ("convert_python", "toolchain", "trained_model", "corpus"),
         tests=("test_trained_model_gives_a_quantization_ladder",))


class Work:
    """The module's work by the key a test reads it with: ("convert", NAME) is the
    conversion of NAME in the group "tiny.convert"."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request

    def result(self, group: str, *key: str) -> Any:
        value = prefetched(self.request, f"tiny.{group}")
        for k in key:
            value = value[k]
        return value


@pytest.fixture(scope="module")
def work(request: pytest.FixtureRequest) -> Work:
    return Work(request)


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
def test_same_arguments_give_identical_bytes(work: Work, models: dict[str, Path]) -> None:
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
def test_converter_accepts(work: Work, name: str) -> None:
    proc: subprocess.CompletedProcess[str] = work.result("convert", name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.args[4]).read_bytes()[:4] == b"GGUF"  # --outfile


@pytest.mark.slow
@pytest.mark.parametrize(("name", "message"), [
    ("gpt2-bpe", "pre-tokenizer was not recognized"),
    ("foo", "Model FooForCausalLM is not supported"),
])
def test_converter_rejects(work: Work, name: str, message: str) -> None:
    proc: subprocess.CompletedProcess[str] = work.result("convert", name)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]


GENERATED = ("spm", "llama-bpe", "qwen2-sharded")


def _generated(python: Path, models: dict[str, Path], env: dict[str, str] | None = None) -> dict[str, str]:
    """What LOAD_AND_GENERATE printed for each of GENERATED, by name."""
    proc = subprocess.run([str(python), "-c", LOAD_AND_GENERATE, *(str(models[name]) for name in GENERATED)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(GENERATED), proc.stdout + proc.stderr[-3000:]
    return dict(zip(GENERATED, lines, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATED)
def test_transformers_loads_and_generates(work: Work, name: str) -> None:
    line = work.result("generated")[name]
    assert not line.startswith("error"), line
    tokenizer_size, vocab_size, count = map(int, line.split())
    assert (tokenizer_size, vocab_size, count) == (4096, 4096, 4)


# -- --train-steps ---------------------------------------------------------------------------


def _train(python: Path, out: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    proc = subprocess.run([str(python), str(SCRIPT), str(out), "--train-steps", "5"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, env=env)
    return proc, out


@pytest.mark.slow
def test_training_is_deterministic(work: Work, models: dict[str, Path]) -> None:
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


def _held_out_loss(python: Path, trained_model: Path, models: dict[str, Path], corpus: Path,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", HELD_OUT_LOSS, str(corpus), str(trained_model), str(models["spm"])],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, env=env)


@pytest.mark.slow
def test_trained_model_has_learned_the_corpus(work: Work) -> None:
    proc: subprocess.CompletedProcess[str] = work.result("held-out")  # the trained model, then the random one
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, random = map(float, proc.stdout.split())
    # ln(4096) = 8.32 is a uniform guess; the trained model reaches ~4.4 on text it never saw.
    assert random > 8.0 and trained < 5.0, (trained, random)


def _perplexity(toolchain: Toolchain, pattern: str, *args: str, env: dict[str, str] | None = None) -> float:
    """The figure `pattern` matches in llama-perplexity's output. The pinned llama.cpp prints
    through a logger thread it never joins (common/log.cpp, llama.cpp issue 22142), so on a
    busy machine the last lines, the summary included, are sometimes lost at exit (more than half
    the runs under load): repeat the deterministic measurement as often as qwrap's own eval does."""
    for _ in range(PERPLEXITY_ATTEMPTS):
        proc = subprocess.run([str(toolchain.tool("llama-perplexity")), "-c", "256", "--chunks",
                               "8", "-t", "1", "-b", "256", *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        match = re.search(pattern, proc.stdout + proc.stderr, re.MULTILINE)
        if match:
            return float(match.group(1))
    raise AssertionError(f"no {pattern!r} in llama-perplexity output:\n{proc.stdout[-3000:]}")


def _ladder(python: Path, converter: Path, trained_model: Path, toolchain: Toolchain, corpus: Path,
            tmp_path: Path, env: dict[str, str] | None = None) -> tuple[float, dict[str, float]]:
    """The trained model converted by hand to bf16, its perplexity, and the KLD of each type of
    QUANT_LADDER against it."""
    tmp_path.mkdir()
    sixteen = tmp_path / "bf16.gguf"
    proc = subprocess.run([str(python), str(converter), str(trained_model), "--outfile",
                           str(sixteen), "--outtype", "bf16"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = tmp_path / "base.kld"
    ppl = _perplexity(toolchain, r"Final estimate: PPL = ([0-9.]+)", "-m", str(sixteen),
                      "-f", str(corpus), "--kl-divergence-base", str(base), env=env)
    kld = {}
    for qtype in QUANT_LADDER:
        gguf = tmp_path / f"{qtype}.gguf"
        quantize = subprocess.run([str(toolchain.tool("llama-quantize")), str(sixteen), str(gguf),
                                   qtype, "1"],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=300, env=env)
        assert quantize.returncode == 0, quantize.stderr[-3000:]
        kld[qtype] = _perplexity(toolchain, r"^Mean\s+KLD:\s+([0-9.]+)", "-m", str(gguf),
                                 "--kl-divergence-base", str(base), "--kl-divergence", env=env)
    return ppl, kld


@pytest.mark.slow
def test_trained_model_gives_a_quantization_ladder(work: Work) -> None:
    ppl, kld = work.result("ladder")
    assert ppl < 200, ppl  # vocabulary 4096: random weights give ~4200
    figures = [kld[qtype] for qtype in QUANT_LADDER]
    assert figures == sorted(figures) and len(set(figures)) == len(figures), kld
