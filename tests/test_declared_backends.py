"""Each backend is declared once (wrapper/qwrap/workers/backends.py), and everything that lists
backends agrees with that declaration: its workers, environment and lock exist; the formats'
--backend choices, the environments, `qwrap setup`, the CLI's help texts, the Makefile and the
README derive from it or match it. In-process, no toolchain."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer.main

from qwrap import cli, envs, install
from qwrap.formats import FORMATS
from qwrap.workers import protocol
from qwrap.workers.backends import BITS, DECLARED_BACKENDS, VALIDATE_BACKEND, Backend, backends_for

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wrapper" / "qwrap"
NAMES = [b.name for b in DECLARED_BACKENDS]
ROUTED = {fmt for b in DECLARED_BACKENDS for fmt in b.formats}


@pytest.mark.parametrize("backend", DECLARED_BACKENDS, ids=lambda b: b.name)
def test_each_backend_has_its_workers_environment_and_lock(backend: Backend) -> None:
    for fmt, module in backend.workers:
        assert fmt in FORMATS and fmt in BITS
        assert (PACKAGE / "workers" / f"{module}.py").is_file(), module
        assert protocol.WORKER_MODULES[backend.name, fmt] == f"qwrap.workers.{module}"
    spec = envs.SPECS[backend.name]
    assert (spec.lock, spec.imports, spec.packages, spec.torch) == (backend.lock, backend.imports, backend.packages, True)
    assert (PACKAGE / "locks" / backend.lock).is_file()
    assert set(backend.packages) <= set(envs.KEY_PACKAGES)
    assert set(backend.packages) <= set(envs.pinned(backend.name)), "each key package is pinned by the lock"


def test_names_are_unique_and_validation_runs_in_a_declared_backend() -> None:
    assert len(set(NAMES)) == len(NAMES)
    assert VALIDATE_BACKEND in NAMES
    assert (PACKAGE / "workers" / f"{protocol.VALIDATE_MODULE.rsplit('.', 1)[1]}.py").is_file()


def test_every_quantize_worker_and_every_lock_is_declared() -> None:
    workers = {p.stem for fmt in ROUTED for p in (PACKAGE / "workers").glob(f"{fmt}_*.py")}
    assert workers == {module for b in DECLARED_BACKENDS for _, module in b.workers}
    locks = {p.name for p in (PACKAGE / "locks").glob("*.txt")}
    assert locks == {s.lock for s in envs.SPECS.values()}


def test_formats_offer_the_declared_backends_default_first() -> None:
    for name, fmt in FORMATS.items():
        assert fmt.BACKENDS == backends_for(name), name
        if fmt.BACKENDS:
            assert fmt.make_options({}, None).backend == fmt.BACKENDS[0]
            assert fmt.listing().rows[0][-1] == ", ".join(fmt.BACKENDS)
    assert ROUTED <= set(FORMATS)


def test_setup_and_environments_follow_the_declaration() -> None:
    assert install.environment_names(["all"], base=False) == NAMES
    assert [n for n in envs.SPECS if n in NAMES] == NAMES
    assert envs.setup_command(NAMES, llama=False) == "qwrap setup --no-llama " + " ".join(f"--backends {n}" for n in NAMES)


def test_the_cli_help_lists_the_declared_backends() -> None:
    command = typer.main.get_command(cli.app)
    assert isinstance(command, click.Group)
    ctx = command.make_context("qwrap", [], resilient_parsing=True)
    setup, env = command.get_command(ctx, "setup"), command.get_command(ctx, "env")
    assert isinstance(setup, click.Command) and isinstance(env, click.Group)
    create = env.commands["create"]
    listed = ", ".join(NAMES)
    assert f"({listed}, or all)" in next(p.help for p in setup.params if p.name == "backends")
    assert f"({listed})" in next(p.help for p in create.params if p.name == "name")


def test_the_makefile_default_is_the_declaration() -> None:
    (line,) = re.findall(r"^BACKENDS \?= (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert line.split() == NAMES


def test_the_gpu_check_script_creates_every_backend() -> None:
    (line,) = re.findall(r"\$\{BACKENDS:-([^}]*)\}", (REPO / "scripts" / "gpu-check").read_text())
    assert sorted(line.split()) == sorted(NAMES)


def test_the_docs_list_the_declared_backends() -> None:
    """Every list of backends in the README and docs/: `(a, b, c, or all)` and each format's
    `--format F ... [--backend a|b]`, default first."""
    found = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for listed in re.findall(r"\(([a-z0-9, -]+), or all\)", text):
            assert listed.split(", ") == NAMES, doc.name
            found += 1
        for fmt, choices in re.findall(r"--format (\w+)\b[^\n]*?\[--backend ([\w|-]+)\]", text):
            assert tuple(choices.split("|")) == FORMATS[fmt].BACKENDS, (doc.name, fmt)
            found += 1
    assert found >= 1 + len(ROUTED)
