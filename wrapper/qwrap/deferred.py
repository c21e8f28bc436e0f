"""Modules a dependency imports at its top for features qwrap never turns on, loaded only when
something uses them.

typer renders every ``--help`` through ``typer.rich_utils``, which imports ``rich.markdown``
(markdown-it and its regular expressions) for ``rich_markup_mode="markdown"`` and
``rich.traceback`` (pygments) for pretty exceptions: about 60 ms of the ~300 ms of
``qwrap --help``, neither used (qwrap's markup is rich's own, its exceptions are its own
messages). ``defer(module, *names)`` puts a stand-in module in ``sys.modules`` whose names are
stand-in classes: calling one, reading an attribute of it or an ``isinstance`` against it loads
the real module and forwards, so code that does use them works unchanged, only later.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _Deferred(type):
    """The metaclass of a stand-in class ``module.name``."""

    _module: str
    _name: str

    def _real(cls) -> Any:
        return getattr(load(cls._module), cls._name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("_"):  # the stand-in's own (and Python's probes of it)
            raise AttributeError(attr)
        return getattr(cls._real(), attr)

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, cls._real())


def load(module: str) -> types.ModuleType:
    """The real ``module``, imported in place of its stand-in (once)."""
    found = sys.modules.get(module)
    if found is not None and not getattr(found, "__deferred__", False):
        return found
    stand_in = sys.modules.pop(module, None)
    try:
        return importlib.import_module(module)
    except BaseException:
        if stand_in is not None:
            sys.modules[module] = stand_in
        raise


def defer(module: str, *names: str) -> None:
    """Stand in for ``module`` (unless it is imported already): ``from module import name``
    then costs nothing until ``name`` is used; any other name loads the real module."""
    if module in sys.modules:
        return
    stand_in = types.ModuleType(module, f"stand-in for {module} (qwrap.deferred): loaded on first use")
    stand_in.__deferred__ = True  # type: ignore[attr-defined]
    for name in names:
        setattr(stand_in, name, _Deferred(name, (), {"_module": module, "_name": name, "__module__": module}))

    def forward(attr: str) -> Any:
        if attr.startswith("__"):  # the import system's probes (a package's __path__, ...)
            raise AttributeError(attr)
        return getattr(load(module), attr)

    stand_in.__getattr__ = forward  # type: ignore[method-assign]
    sys.modules[module] = stand_in
    parent, _, child = module.rpartition(".")
    if parent:  # `import rich.markdown` then reads the attribute of the package
        setattr(importlib.import_module(parent), child, stand_in)
