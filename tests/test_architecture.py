"""The rules that keep the shape (ARCHITECTURE.md), checked on the source itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wrapper" / "qwrap"
PARENT_MODULES = sorted(
    p for p in PACKAGE.rglob("*.py") if "workers" not in p.parts
)


def test_parent_never_imports_heavy_libraries() -> None:
    modules = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in PARENT_MODULES]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (
        "import sys\n" + "".join(f"import {m}\n" for m in modules)
        + "heavy = {'torch', 'transformers', 'numpy', 'awq', 'auto_gptq', 'gptqmodel', 'pyarrow', 'matplotlib'} & set(sys.modules)\n"
        + "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


HELP_AND_AFTER = """
import contextlib, io, sys
from qwrap.cli import main_inner
with contextlib.redirect_stdout(io.StringIO()) as out:
    main_inner(["--help"])
assert "run" in out.getvalue() and "Commands" in out.getvalue(), out.getvalue()
print(sorted({"markdown_it", "pygments", "rich.syntax", "qwrap.formats"} & set(sys.modules)))
# what a later caller of the deferred modules gets is the real thing
from rich.console import Console
from rich.markdown import Markdown
from rich.traceback import Traceback
import rich.markdown
with contextlib.redirect_stdout(io.StringIO()) as shown:
    Console(width=40).print(Markdown("# Title"))
try:
    1 / 0
except ZeroDivisionError as exc:
    tb = Traceback.from_exception(type(exc), exc, exc.__traceback__)
assert "Title" in shown.getvalue() and type(tb).__module__ == "rich.traceback"
assert isinstance(Markdown("x"), Markdown) and rich.markdown.Markdown.__module__ == "rich.markdown"
assert "markdown_it" in sys.modules
"""


def test_help_loads_no_module_it_does_not_use() -> None:
    """typer's help renderer imports markdown-it and pygments for features qwrap never turns on:
    `qwrap --help` defers them (deferred.py), and whoever uses them later gets the real ones.
    It lists `run` and `plan` without building them, so without importing the formats."""
    proc = subprocess.run([sys.executable, "-c", HELP_AND_AFTER], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_only_the_supervisor_spawns() -> None:
    spawning = re.compile(r"subprocess\.(Popen|run|call|check_call|check_output)|os\.(fork|exec|spawn|system|popen)|pty\.fork|pexpect\.spawn")
    offenders = [p.name for p in PARENT_MODULES if p.name != "supervisor.py" and spawning.search(p.read_text())]
    assert offenders == []


def test_only_errors_defines_exit_codes() -> None:
    pattern = re.compile(r"^\s*exit_code\s*(:.*)?=\s*\d|sys\.exit\(\s*[1-9]|\bcode\s*=\s*[1-9]\d*\b", re.MULTILINE)
    offenders = [p.name for p in PARENT_MODULES if p.name != "errors.py" and pattern.search(p.read_text())]
    assert offenders == []


def test_no_pickle_loading() -> None:
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        assert "pickle.load" not in text and "torch.load(" not in text, p


def test_lint_and_types() -> None:
    """ruff and mypy pass; a failure shows their messages."""
    root = PACKAGE.parents[1]
    bin_dir = Path(sys.executable).parent
    for argv in ([str(bin_dir / "ruff"), "check", "wrapper", "tests"], [str(bin_dir / "mypy")]):
        proc = subprocess.run(argv, cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, f"{Path(argv[0]).name} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_every_child_goes_through_the_one_run_and_check_path() -> None:
    callers = [p.name for p in PARENT_MODULES if p.name not in ("supervisor.py", "children.py")
               and re.search(r"supervisor\.run\(|from \.supervisor import run\b", p.read_text())]
    assert callers == []


def test_the_architecture_doc_names_only_modules_that_exist() -> None:
    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:formats/|workers/)?[a-z_]+\.py)`", doc))
    assert {"runner.py", "plan.py", "formats/__init__.py", "supervisor.py"} <= named
    missing = sorted(n for n in named if not (PACKAGE / n).exists() and not n.startswith(("test_", "formats/<")))
    assert missing == []
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.glob("*.py")} - {"__init__.py"}
    assert sorted(modules - named) == []  # and every module of the package is in it
