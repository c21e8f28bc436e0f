"""A format owns everything about itself: nothing outside formats/, workers/ and the registry
names one, and adding one is a module plus one registry line (proved on a copy of the package)."""

from __future__ import annotations

import ast
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qwrap.formats import FORMATS

PACKAGE = Path(__file__).resolve().parents[1] / "wrapper" / "qwrap"
DATA = Path(__file__).resolve().parent / "data" / "formats"


def _outside_formats() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if not {"formats", "workers"} & set(p.relative_to(PACKAGE).parts)]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_nothing_outside_the_formats_names_a_format() -> None:
    names = set(FORMATS)
    offenders = []
    for path in _outside_formats():
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.split(".")[-1] in names or (node.module.endswith("formats")
                                                            and {a.name for a in node.names} & names)):
                offenders.append(f"{path.name}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[-1] in names for a in node.names):
                offenders.append(f"{path.name}:{node.lineno} imports a format")
            elif isinstance(node, ast.Constant) and id(node) not in skip and isinstance(node.value, str) \
                    and node.value.lower() in names:
                offenders.append(f"{path.name}:{node.lineno} names {node.value!r}")
    assert offenders == []


def _add_echo_format(tmp_path: Path) -> Path:
    """A copy of the package with one new format: its module and one line in the registry."""
    copy = tmp_path / "pkg" / "qwrap"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(DATA / "echo.py", copy / "formats" / "echo.py")
    registry = copy / "formats" / "__init__.py"
    text = registry.read_text()
    text = text.replace("from . import awq, gguf, gptq\n", "from . import awq, echo, gguf, gptq\n")
    text = text.replace('"gptq": gptq}', '"gptq": gptq, "echo": echo}')
    registry.write_text(text)
    return copy


def _changed_files(original: Path, copy: Path) -> list[str]:
    changed: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        changed.extend(prefix + n for n in cmp.diff_files + cmp.right_only if n != "__pycache__")
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(original, copy, ignore=["__pycache__"]), "")
    return sorted(changed)


def _qwrap(copy: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # the pin is read from the checkout's vendor/ (the copy has none)
    env = {**os.environ, "PYTHONPATH": str(copy.parent), "QWRAP_LLAMA_LOCK": str(PACKAGE.parents[1] / "vendor" / "llama.cpp.lock")}
    return subprocess.run([sys.executable, "-m", "qwrap.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=120)


def test_adding_a_format_is_one_module_and_one_registry_line(tmp_path: Path) -> None:
    copy = _add_echo_format(tmp_path)
    assert _changed_files(PACKAGE, copy) == ["formats/__init__.py", "formats/echo.py"]
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["EchoForCausalLM"]}))
    help_text = _qwrap(copy, "run", "--help", cwd=tmp_path).stdout
    assert "--echo-text" in help_text and "Echo (test format)" in help_text  # its option group is mounted
    listed = _qwrap(copy, "formats", cwd=tmp_path)
    assert listed.returncode == 0 and "--echo-text" in listed.stdout
    plan = _qwrap(copy, "plan", str(model), "-f", "echo", "--echo-text", "hi", "-o", str(tmp_path / "o"), "--json",
                  cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    steps = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert set(steps) == {"echo.write", "echo.validate"} and steps["echo.write"]["params"] == {"text": "hi"}
    run = _qwrap(copy, "run", str(model), "-f", "echo", "--echo-text", "hi", "-o", str(tmp_path / "o"), "--json",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    (artifact,) = result["artifacts"]
    assert artifact["validated"] and artifact["quality"]["runtime"] == "exact" and Path(artifact["path"]).read_text() == "hi"
    assert {s["id"]: s["fingerprint"] for s in result["steps"]} == {i: s["fingerprint"] for i, s in steps.items()}
    assert "cat m-echo.txt" in (tmp_path / "o" / "README.md").read_text()  # its model-card usage
    bad = _qwrap(copy, "run", str(model), "-f", "echo", "--echo-text", "", "-o", str(tmp_path / "o2"), cwd=tmp_path)
    assert bad.returncode == 2 and "--echo-text must not be empty" in bad.stderr  # its validation


def test_format_modules_never_import_the_registry() -> None:
    """The registry imports every format; a format imports ``formats/base.py`` (the Protocol,
    ``producer_chain``), never the registry, so no format sits in an import circle."""
    from test_imports import cycles, import_graph

    graph = import_graph()
    members = [m for m in graph if m.startswith("qwrap.formats.")]
    assert "qwrap.formats.gguf.actions" in members
    assert [m for m in members if "qwrap.formats" in graph[m]] == []
    assert [c for c in cycles(graph) if any(m.startswith("qwrap.formats") for m in c)] == []


def test_the_registry_loads_only_what_help_needs() -> None:
    """`qwrap --help` reads every format's declaration; what runs (checks, steps, estimates,
    actions, the worker client, the environments, the supervisor) loads when first called."""
    runs = ["qwrap.formats.hfquant", "qwrap.formats.gguf.modelchecks", "qwrap.formats.gguf.estimates",
            "qwrap.formats.gguf.steps", "qwrap.formats.gguf.actions", "qwrap.worker_client", "qwrap.envs",
            "qwrap.children", "qwrap.supervisor", "qwrap.toolchain", "qwrap.workers.protocol", "psutil"]
    code = ("import sys\nfrom qwrap.formats import FORMATS\n"
            "assert all(callable(f.execute) and f.OPTIONS for f in FORMATS.values())\n"
            f"print(sorted(set({runs!r}) & set(sys.modules)))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_every_format_keeps_the_protocol_once_all_its_parts_are_loaded() -> None:
    """A format package's submodule must not share a name with a Protocol member: importing it
    would rebind that name on the package (gguf's model checks live in ``modelchecks``)."""
    import importlib
    import types

    from qwrap.formats import Format

    for part in ("hfquant", "gguf.modelchecks", "gguf.estimates", "gguf.steps", "gguf.actions"):
        importlib.import_module(f"qwrap.formats.{part}")
    members = set(Format.__annotations__) | {n for n, v in vars(Format).items() if callable(v) and not n.startswith("_")}
    assert {"NAME", "OPTIONS", "checks", "add_steps", "execute", "card_usage"} <= members
    for name, fmt in FORMATS.items():
        assert [m for m in members if isinstance(getattr(fmt, m), types.ModuleType)] == [], name
