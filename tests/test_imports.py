"""No import circles in the package: every import counts, at module level, inside a function or
under ``TYPE_CHECKING``, so a module's place in the one-way flow is its place in the graph (a
value type lives in the lowest module that needs it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wrapper" / "qwrap"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its source. ``from P import name``
    is an edge to ``P.name`` when that is a module (``from . import hfquant``), else to ``P``;
    a package's ``__init__`` is not counted for its submodules (Python imports it first anyway)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        edges.add(sub)
                    elif target in modules:
                        edges.add(target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checker itself: a circle closed only by a function-local import, and one closed only
    under TYPE_CHECKING, are both found; a package importing its own submodule is not a circle."""
    pkg = tmp_path / "qwrap"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\n")
    (pkg / "b.py").write_text("B = 1\ndef f():\n    from . import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n")
    (pkg / "d.py").write_text("from .c import C\n")
    (pkg / "sub" / "__init__.py").write_text("from . import x\n")
    (pkg / "sub" / "x.py").write_text("from . import y\n")
    (pkg / "sub" / "y.py").write_text("")
    assert cycles(import_graph(pkg)) == [["qwrap.a", "qwrap.b"], ["qwrap.c", "qwrap.d"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "qwrap.results" in graph["qwrap.pipeline"]
    assert cycles(graph) == []


def test_value_types_live_with_their_owners() -> None:
    """The three types that used to close circles: the upload's in hub_upload, the outcome in
    results, the model source in modelfiles; the renderers and publish read results only."""
    graph = import_graph()
    assert "qwrap.publish" not in graph["qwrap.hub"] and "qwrap.publish" not in graph["qwrap.hub_upload"]
    assert "qwrap.pipeline" not in graph["qwrap.results"]
    assert "qwrap.hub" not in graph["qwrap.modelfiles"]
    for renderer in ("qwrap.report", "qwrap.modelcard", "qwrap.qualitypage"):
        assert "qwrap.formats" not in graph[renderer], f"{renderer} asks the format registry"
        assert "qwrap.journal" not in graph[renderer], f"{renderer} reads the journal"
