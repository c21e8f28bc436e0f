"""The CLI as users see it: help that teaches, versions, formats, doctor, a Hub model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_qwrap
from hubserver import HubServer
from qwrap.formats.gguf import QUANT_TYPES
from qwrap.toolchain import Toolchain, read_pin

COMMANDS = ("run", "resume", "status", "eval", "formats", "doctor", "env", "setup")


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def test_help_lists_every_command_and_teaches() -> None:
    """A snapshot of the command surface: catches typer/click breakage."""
    proc = run_qwrap("--help", env={"COLUMNS": "120", "TERM": "dumb"})
    assert proc.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"\b{command}\b", proc.stdout), command
    run_help = plain(run_qwrap("run", "--help", env={"COLUMNS": "200"}).stdout)
    for option in ("--format", "--quant", "--output", "--revision", "--token", "--outtype", "--imatrix",
                   "--calib", "--threads", "--stall-timeout", "--keep-intermediate", "--force", "--json",
                   "--no-preflight", "--jobs", "--eval-text", "--eval-tokens", "--eval-ctx", "--no-eval", "--max-kld",
                   "--no-imatrix", "--split-max-size", "--push-to", "--base-model"):
        assert option in run_help, option
    assert "Examples" in run_help and "qwrap run" in run_help


def test_version_names_the_pin() -> None:
    proc = run_qwrap("--version")
    assert proc.returncode == 0 and read_pin().commit[:12] in proc.stdout


def test_formats_lists_all_types() -> None:
    out = plain(run_qwrap("formats", env={"COLUMNS": "200"}).stdout)
    for name in QUANT_TYPES:
        assert f" {name} " in out, name


def test_doctor_json(toolchain: Toolchain) -> None:
    proc = run_qwrap("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["llama_cpp"]["ok"] and info["llama_cpp"]["pinned_commit"] == read_pin().commit
    assert "0c1e570" in info["llama_cpp"]["version"]
    assert info["environments"]["convert"]["ok"]
    assert info["gpu"]["present"] in (True, False)


def test_missing_toolchain_says_what_to_run(tmp_path: Path, tiny_model: Path) -> None:
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "o"),
                     env={"QWRAP_CACHE_DIR": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 7 and "make llama" in proc.stderr


def test_status_and_resume_need_a_journal(tmp_path: Path) -> None:
    for cmd in ("status", "resume"):
        proc = run_qwrap(cmd, str(tmp_path))
        assert proc.returncode == 2 and "journal" in proc.stderr


@pytest.mark.slow
def test_hub_model_end_to_end_with_token_hidden(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    token = "hf_test_secret_token_1234"
    with HubServer() as hub:
        hub.add_repo("acme/tiny-llama", tiny_model, private=True, allowed_tokens=(token,))
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        denied = run_qwrap("run", "acme/tiny-llama", "-o", str(tmp_path / "denied"), "-q", "Q8_0", env=env)
        assert denied.returncode == 4, denied.stderr
        proc = run_qwrap("run", "acme/tiny-llama", "-o", str(tmp_path / "o"), "-q", "Q8_0", "--json",
                         env={**env, "HF_TOKEN": token})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"]["repo_id"] == "acme/tiny-llama" and len(result["model"]["revision"]) == 40
    assert result["artifacts"][0]["validated"]
    assert (tmp_path / "o" / "tiny-llama-Q8_0.gguf").is_file()
    for path in (tmp_path / "o").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert token not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_plan_of_a_hub_model_downloads_no_weights(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    with HubServer() as hub:
        hub.add_repo("acme/tiny-llama", tiny_model)
        proc = run_qwrap("plan", "acme/tiny-llama", "-o", str(tmp_path / "o"), "-q", "Q4_K_M", "--json",
                         env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
        downloaded = hub.downloads("acme/tiny-llama")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert "model.safetensors" not in downloaded and "config.json" in downloaded
    assert plan["parameters"] > 3_000_000  # from the safetensors header, fetched by range request
    checks = {c["name"]: c["ok"] for c in plan["checks"]}
    assert checks["hub cache"] and checks["architecture"] and checks["tokenizer"]
    assert plan["disk"]["hub_cache"]["download_bytes"] > 6_000_000


def test_doctor_names_what_is_missing_and_the_one_fix(tmp_path: Path) -> None:
    proc = run_qwrap("doctor", "--json", env={"QWRAP_CACHE_DIR": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {"llama.cpp", "convert", "report", "gptqmodel"} <= set(info["missing"])
    assert info["fix"].startswith("qwrap setup") and "--backends gptqmodel" in info["fix"]
    text = run_qwrap("doctor", env={"QWRAP_CACHE_DIR": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin",
                                    "COLUMNS": "200"})
    assert "One command fixes it: qwrap setup" in plain(text.stdout)
