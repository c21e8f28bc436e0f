"""The CLI as users see it: help that teaches, versions, formats, doctor, a Hub model."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from conftest import cuda_devices, run_qwrap
from hubserver import HubServer
from qwrap import cli
from qwrap.formats.gguf import QUANT_TYPES
from qwrap.toolchain import Toolchain, read_pin

COMMANDS = ("run", "plan", "push", "resume", "status", "eval", "formats", "doctor", "env", "setup")
# What users and scripts rely on, per command: each must be a row of the command's help.
OPTIONS = {
    "run": ("--format", "--quant", "--output", "--revision", "--token", "--outtype", "--imatrix", "--calib",
            "--threads", "--stall-timeout", "--keep-intermediate", "--force", "--json", "--preflight", "--jobs",
            "--eval-text", "--eval-tokens", "--eval-ctx", "--eval", "--max-kld", "--no-imatrix", "--split-max-size",
            "--push-to", "--base-model", "--events", "--step", "--backend", "--bits", "--group-size",
            "--trust-remote-code"),
    "plan": ("--format", "--quant", "--output", "--json", "--emit", "--partition", "--gpu-partition", "--account",
             "--eval-tokens", "--jobs"),
    "push": ("--private", "--revision", "--create-pr", "--token", "--base-model", "--json"),
}
ARGUMENTS = {"run": ["model"], "plan": ["model"], "push": ["output", "repo_id"]}


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def panels(text: str) -> dict[str, list[str]]:
    """The first word of every row of every boxed panel of a help page, by panel title (a
    row's wrapped continuation lines start with spaces and are not rows)."""
    found: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        start = re.match(r"╭─ (.+?) ─", line)
        if start:
            title = start[1]
            found[title] = []
        elif line.startswith("╰"):
            title = None
        elif title is not None:
            row = re.match(r"│ (?:\* +)?([^\s│]+)", line)
            if row:
                found[title].append(row[1])
    return found


def examples(text: str) -> list[list[str]]:
    """The command lines a help page shows as examples (outside the panels)."""
    lines = []
    for line in text.splitlines():
        found = re.match(r"\s*(?:Example: )?qwrap (\S.*?)\s*$", line)
        if found and not line.startswith(("│", "╭", "╰")):
            lines.append(shlex.split(found[1].split("&&")[0]))
    return lines


def help_page(*args: str) -> str:
    proc = run_qwrap(*args, "--help", env={"COLUMNS": "200", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_lists_every_command_and_option_and_its_examples_parse() -> None:
    """The command surface as rendered (catches typer/click/rich breakage): the top-level help
    lists every command in its Commands panel; run, plan and push list every option they take
    as a row of an option panel, and their arguments; every example they show parses."""
    group = typer.main.get_command(cli.app)
    assert isinstance(group, click.Group)
    top = help_page()
    assert sorted(panels(top)["Commands"]) == sorted(group.commands) and set(COMMANDS) <= set(group.commands)
    shown = examples(top)
    listed = {name: command.help for name, command in group.commands.items()}  # run, plan: built on use
    root = group.make_context("qwrap", [], resilient_parsing=True)
    built = {name: group.get_command(root, name) for name in group.list_commands(root)}
    assert listed == {name: command.help for name, command in built.items() if command}
    for command in ("run", "plan", "push"):
        page = help_page(command)
        sub = built[command]
        rows = panels(page)
        options = [row for title, names in rows.items() if title != "Arguments" for row in names]
        declared = [p.opts[0] for p in sub.params if isinstance(p, click.Option) and not p.hidden]
        assert sorted(options) == sorted([*declared, "--help"]), (command, set(options) ^ {*declared, "--help"})
        missing = [o for o in OPTIONS[command] if o not in options]
        assert not missing, (command, missing)
        assert rows["Arguments"] == ARGUMENTS[command]
        own = [e for e in examples(page) if e[0] == command]
        assert own, f"qwrap {command} --help shows no example"
        shown += own
    for argv in shown:
        assert argv[0] in built, argv
        sub = built[argv[0]]
        try:
            sub.make_context(argv[0], argv[1:], resilient_parsing=False)
        except click.ClickException as exc:
            raise AssertionError(f"the help's example `qwrap {shlex.join(argv)}` does not parse: {exc}") from None


def test_version_names_the_pin() -> None:
    proc = run_qwrap("--version")
    assert proc.returncode == 0 and read_pin().commit[:12] in proc.stdout


def test_formats_lists_all_types() -> None:
    out = plain(run_qwrap("formats", env={"COLUMNS": "200"}).stdout)
    for name in QUANT_TYPES:
        assert f" {name} " in out, name


@pytest.mark.slow
def test_doctor_json(toolchain: Toolchain, tmp_path: Path) -> None:
    proc = run_qwrap("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["llama_cpp"]["ok"] and info["llama_cpp"]["pinned_commit"] == read_pin().commit
    assert "0c1e570" in info["llama_cpp"]["version"]
    assert info["environments"]["convert"]["ok"]
    # what this machine has: a GPU exactly when nvidia-smi lists one
    devices = cuda_devices()
    assert info["gpu"]["present"] is bool(devices), (info["gpu"], devices)
    if devices:
        assert len(info["gpu"]["devices"]) == len(devices), (info["gpu"], devices)
    else:
        assert "nvidia-smi" in info["gpu"]["detail"], info["gpu"]
    # and what another would: an nvidia-smi that answers, one that fails
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    path = f"{smi.parent}:/usr/bin:/bin"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\necho 'NVIDIA H200, 143771 MiB'\n")
    smi.chmod(0o755)
    gpu = json.loads(run_qwrap("doctor", "--json", env={"PATH": path}).stdout)["gpu"]
    assert gpu == {"present": True, "devices": ["NVIDIA H200, 143771 MiB"] * 2}, gpu
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n")
    gpu = json.loads(run_qwrap("doctor", "--json", env={"PATH": path}).stdout)["gpu"]
    assert gpu["present"] is False and "nvidia-smi failed" in gpu["detail"], gpu


@pytest.mark.slow
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
