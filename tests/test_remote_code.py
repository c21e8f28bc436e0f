"""A model with its own code (config.json auto_map + modeling_*.py): AWQ/GPTQ refuse it,
naming the files and --trust-remote-code; with the flag the code runs in the workers (proved
by a marker the code writes) and the result and model card say so."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from background import Lane, prefetch, prefetched
from conftest import REPO, run_qwrap
from qwrap.errors import UnsupportedModelError

SMALL = ("--calib-samples", "4", "--calib-seq-len", "64", "--threads", "1", "--no-eval")


def custom_model(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "custom-llama"
    shutil.copytree(tiny_model, folder)
    shutil.copyfile(REPO / "tests" / "data" / "remote-code" / "modeling_tiny.py", folder / "modeling_tiny.py")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture
def custom(tiny_model: Path, tmp_path: Path) -> Path:
    return custom_model(tiny_model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_custom_code_is_refused_naming_the_files_and_the_flag(custom: Path, tmp_path: Path, corpus: Path,
                                                               fmt: str) -> None:
    proc = run_qwrap("run", str(custom), "--format", fmt, "--calib", str(corpus), "-o", str(tmp_path / "o"), *SMALL)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == UnsupportedModelError.exit_code, proc.stderr
    assert "auto_map: AutoModelForCausalLM -> modeling_tiny.TinyLlamaForCausalLM" in text
    assert "modeling_tiny.py" in text and "--trust-remote-code" in text
    assert "pip install" not in text and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_plan_passes_the_flag_to_both_workers_steps(custom: Path, tmp_path: Path, corpus: Path) -> None:
    proc = run_qwrap("plan", str(custom), "--format", "awq", "--calib", str(corpus), "-o", str(tmp_path / "o"),
                     "--trust-remote-code", "--json", *SMALL)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    checks = {c["name"]: c for c in plan["checks"]}
    assert checks["custom code"]["ok"] and "--trust-remote-code" in checks["custom code"]["detail"]
    assert {s["id"]: s["params"]["trust_remote_code"] for s in plan["steps"] if s["format"] == "awq"} == {
        "awq.quantize": True, "awq.validate": True}
    off = run_qwrap("plan", str(tiny_model_of(custom)), "--format", "awq", "--calib", str(corpus),
                    "-o", str(tmp_path / "o"), "--json", *SMALL)
    assert off.returncode == 0, off.stderr
    assert all(not s["params"]["trust_remote_code"] for s in json.loads(off.stdout)["steps"] if s["format"] == "awq")


def tiny_model_of(custom: Path) -> Path:
    """The same model without its own code."""
    plain = custom.with_name("plain-llama")
    shutil.copytree(custom, plain)
    (plain / "modeling_tiny.py").unlink()
    config = json.loads((plain / "config.json").read_text())
    del config["auto_map"]
    (plain / "config.json").write_text(json.dumps(config))
    return plain


def _trusted_run(tiny_model: Path, corpus: Path, on: Lane,
                 tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """GPTQ of the model with its own code, trusted: the run, the marker its code writes, OUT."""
    custom = custom_model(tiny_model, tmp_path)
    marker = tmp_path / "ran"
    out = tmp_path / "o"
    proc = on.qwrap("run", str(custom), "--format", "gptq", "--calib", str(corpus), "-o", str(out),
                    "--trust-remote-code", "--json", *SMALL, env={"QWRAP_TEST_REMOTE_CODE_MARKER": str(marker)})
    return proc, marker, out


prefetch(__name__, "remote_code.trusted", _trusted_run, ("tiny_model", "corpus"),
         tests=("test_trusted_code_runs_in_the_workers_and_is_recorded",))


@pytest.mark.backend
def test_trusted_code_runs_in_the_workers_and_is_recorded(request: pytest.FixtureRequest) -> None:
    proc, marker, out = prefetched(request, "remote_code.trusted")  # on the session's lane (background.py)
    assert proc.returncode == 0, proc.stderr
    assert marker.is_file() and len(set(marker.read_text().split())) >= 2  # quantize and validate workers
    result = json.loads(proc.stdout)
    assert [a["trust_remote_code"] for a in result["artifacts"]] == [True]
    assert "--trust-remote-code" in (out / "README.md").read_text()
    assert (Path(result["artifacts"][0]["path"]) / "modeling_tiny.py").is_file()  # loadable with its code
