"""AWQ/GPTQ through `qwrap run`: option checks before work, and end to end in the real backend
environments (on the architecture matrix's Qwen3 run) with the plan that run executed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from background import prefetched
from conftest import intervals, overlapping, run_qwrap
from test_arch_models import CALIB, EVAL, matrix_texts  # registers the matrix's runs (background.py)


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


@pytest.fixture(scope="module")
def hf_run(request: pytest.FixtureRequest) -> tuple[Path, Path, dict]:
    """The architecture matrix's run of its dense Qwen3 (Qwen2's BPE tokenizer): GGUF, AWQ and
    GPTQ in one `qwrap run`, calibrated on 8 samples of 64 tokens (test_arch_models.py, on the
    session's lane, background.py): its model, output folder and result. A GPTQ run killed
    mid-run and resumed through qwrap is there too, the worker-level resume of each backend in
    test_backends.py."""
    model, proc = prefetched(request, "arch_models.qwen3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    return model, Path(result["artifacts"][0]["path"]).parent, result


@pytest.mark.backend
def test_awq_and_gptq_end_to_end(hf_run: tuple[Path, Path, dict]) -> None:
    model, out, result = hf_run
    arts = {a["format"]: a for a in result["artifacts"] if a["format"] in ("awq", "gptq")}
    assert set(arts) == {"awq", "gptq"}
    for fmt, art in arts.items():
        folder = Path(art["path"])
        assert folder == out / f"{model.name}-{fmt.upper()}-4bit-g128" and folder.is_dir()
        assert art["validated"] and art["quality"]["kld_mean"] > 0
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["bits"] == 4
        assert list(folder.glob("*.safetensors"))
        assert all(f.stat().st_mode & 0o044 for f in folder.iterdir()), "artifact files not readable by others"
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (model / name).read_bytes()
        assert 3 < art["bits_per_weight"] < 16
        calib = art["calibration"]
        assert calib["n_samples"] == 8 and calib["seq_len"] == 64 and "seed" in calib
    # AWQ by default on gptqmodel, in the AutoAWQ-compatible layout vLLM and transformers load
    awq = json.loads((Path(arts["awq"]["path"]) / "config.json").read_text())["quantization_config"]
    assert awq["quant_method"] == "awq" and awq["version"] == "gemm", awq
    assert result["request"]["format_options"]["awq"]["backend"] == "gptqmodel"
    assert not list(out.glob("*.partial"))
    assert not (out / ".checkpoint" / "layers").exists(), "layer checkpoints kept after success"
    # one AWQ/GPTQ worker at a time (each holds the model, and the GPU when there is one); GGUF's
    # llama.cpp tools run beside them
    workers = {step: span for step, span in intervals(out).items() if step.startswith(("awq.", "gptq."))}
    assert len(workers) == 4 and overlapping(workers) == []
    # the source model is loaded once a run, for the reference of the measurement the next
    # artifact reuses (its validation is the measurement)
    logs = out / ".checkpoint" / "logs"
    loads = [(logs / f"{fmt}.validate.log").read_text().count('"unit": "reference model"') for fmt in arts]
    assert sorted(loads) == [0, 1], loads
    card = (out / "README.md").read_text()
    # a local folder is no Hub id: the card names no base_model (qwrap push --base-model sets one)
    assert "base_model:" not in card and "AWQ" in card and "KL " in card


@pytest.mark.backend
def test_plan_estimates_hf_sizes(hf_run: tuple[Path, Path, dict], tmp_path: Path, corpus: Path) -> None:
    model, _, result = hf_run
    calib, held_out = matrix_texts(corpus, tmp_path)  # the same texts, written again
    proc = run_qwrap("plan", str(model), "-o", str(tmp_path / "p"), "--format", "awq", "--format", "gptq",
                     "--calib", str(calib), "--json")
    assert proc.returncode == 0, proc.stderr
    expected = {a["format"]: a["expected_bytes"] for a in json.loads(proc.stdout)["artifacts"]}
    # the plan of the same options is the one the run executed (ids and fingerprints)
    same = run_qwrap("plan", str(model), "-o", str(tmp_path / "p"), "-f", "gguf", "-f", "awq", "-f", "gptq",
                     "--calib", str(calib), *CALIB, "--eval-text", str(held_out), *EVAL, "--json")
    planned = [(s["id"], s["fingerprint"]) for s in json.loads(same.stdout)["steps"]]
    assert planned == [(s["id"], s["fingerprint"]) for s in result["steps"]]
    assert {c["name"] for c in json.loads(same.stdout)["checks"]} >= {"group size", "disk", "toolchain"}
    for art in (a for a in result["artifacts"] if a["format"] in expected):
        assert abs(expected[art["format"]] - art["bytes"]) / art["bytes"] < 0.10, (art["format"], art["bytes"])
