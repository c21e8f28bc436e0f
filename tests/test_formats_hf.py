"""AWQ/GPTQ through `qwrap run`: option checks before work, end to end in the real backend
environments, and kill-and-resume identity at the CLI level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from background import Lane, prefetch, prefetched
from conftest import intervals, overlapping, run_qwrap

SMALL = ("--calib-samples", "4", "--calib-seq-len", "64", "--threads", "1")


@pytest.mark.parametrize(
    "args,code,text",
    [
        (("--format", "gptq", "--bits", "5"), 2, "--bits"),
        (("--format", "awq", "--bits", "8"), 2, "--bits"),
        (("--format", "awq", "--group-size", "96"), 2, "group"),
        (("--format", "gptq", "--backend", "autoawq"), 2, "--backend"),
        (("--format", "gptq", "--backend", "auto-gptq"), 16, "gptqmodel"),
        (("--format", "awq", "--awq-version", "fast"), 2, "gemm"),
        (("--format", "gptq", "--damp", "1.5"), 2, "--damp"),
        (("--format", "awq", "--device", "tpu"), 2, "--device"),
    ],
)
def test_bad_options_rejected_before_work(tmp_path: Path, args: tuple[str, ...], code: int, text: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                                                   "intermediate_size": 512}))
    out = tmp_path / "o"
    proc = run_qwrap("run", str(model), "-o", str(out), *args)
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert not (out / ".checkpoint" / "logs").exists()


@pytest.mark.slow
def test_group_size_must_divide_widths(tiny_model: Path, tmp_path: Path, corpus: Path) -> None:
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "o"), "--format", "awq",
                     "--group-size", "512", "--calib", str(corpus))
    assert proc.returncode == 2 and "does not divide" in proc.stderr, proc.stderr


def _hf_run(model: Path, corpus: Path, on: Lane, out: Path) -> tuple[Path, dict]:
    proc = on.qwrap("run", str(model), "-o", str(out), "--format", "awq", "--format", "gptq",
                    "--calib", str(corpus), *SMALL, "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


# On the session's lane (background.py). A GPTQ run killed mid-run and resumed through qwrap is
# in test_arch_models.py (a Qwen3, beyond GPTQModel's own list), the worker-level resume of each
# backend in test_backends.py.
prefetch(__name__, "formats_hf.hf_run", _hf_run, ("tiny_model", "corpus"),
         tests=("test_awq_and_gptq_end_to_end", "test_plan_estimates_hf_sizes"))


@pytest.fixture(scope="module")
def hf_run(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """AWQ and GPTQ of the tiny model, calibrated on a few samples of the corpus."""
    return prefetched(request, "formats_hf.hf_run")


@pytest.mark.backend
def test_awq_and_gptq_end_to_end(hf_run: tuple[Path, dict], tiny_model: Path) -> None:
    out, result = hf_run
    arts = {a["format"]: a for a in result["artifacts"]}
    assert set(arts) == {"awq", "gptq"}
    for fmt, art in arts.items():
        folder = Path(art["path"])
        assert folder == out / f"tiny-llama-{fmt.upper()}-4bit-g128" and folder.is_dir()
        assert art["validated"] and art["quality"]["kld_mean"] > 0
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["bits"] == 4
        assert list(folder.glob("*.safetensors"))
        assert all(f.stat().st_mode & 0o044 for f in folder.iterdir()), "artifact files not readable by others"
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (tiny_model / name).read_bytes()
        assert 3 < art["bits_per_weight"] < 16
        calib = art["calibration"]
        assert calib["n_samples"] == 4 and calib["seq_len"] == 64 and "seed" in calib
    # AWQ by default on gptqmodel, in the AutoAWQ-compatible layout vLLM and transformers load
    awq = json.loads((Path(arts["awq"]["path"]) / "config.json").read_text())["quantization_config"]
    assert awq["quant_method"] == "awq" and awq["version"] == "gemm", awq
    assert result["request"]["format_options"]["awq"]["backend"] == "gptqmodel"
    assert not list(out.glob("*.partial"))
    assert not (out / ".checkpoint" / "layers").exists(), "layer checkpoints kept after success"
    # one AWQ/GPTQ worker at a time (each holds the model, and the GPU when there is one)
    assert overlapping(intervals(out)) == []
    card = (out / "README.md").read_text()
    # a local folder is no Hub id: the card names no base_model (qwrap push --base-model sets one)
    assert "base_model:" not in card and "AWQ" in card and "KL " in card


@pytest.mark.backend
def test_plan_estimates_hf_sizes(hf_run: tuple[Path, dict], tiny_model: Path, tmp_path: Path, corpus: Path) -> None:
    _, result = hf_run
    proc = run_qwrap("plan", str(tiny_model), "-o", str(tmp_path / "p"), "--format", "awq", "--format", "gptq",
                     "--calib", str(corpus), "--json")
    assert proc.returncode == 0, proc.stderr
    expected = {a["format"]: a["expected_bytes"] for a in json.loads(proc.stdout)["artifacts"]}
    # the plan of the same options is the one the run executed (ids and fingerprints)
    same = run_qwrap("plan", str(tiny_model), "-o", str(tmp_path / "p"), "--format", "awq", "--format", "gptq",
                     "--calib", str(corpus), *SMALL, "--json")
    planned = [(s["id"], s["fingerprint"]) for s in json.loads(same.stdout)["steps"]]
    assert planned == [(s["id"], s["fingerprint"]) for s in result["steps"]]
    assert {c["name"] for c in json.loads(same.stdout)["checks"]} >= {"group size", "disk", "toolchain"}
    for art in result["artifacts"]:
        assert abs(expected[art["format"]] - art["bytes"]) / art["bytes"] < 0.10, (art["format"], art["bytes"])
