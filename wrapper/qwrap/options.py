"""Command-line options as plain values, so that a format declares its own option group and
the CLI mounts it (cli.py turns these into typer options; nothing here imports typer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    name: str  # the Python name, and the key in the values a format receives
    type: Any  # int, float, str, bool, list[str], or "str | None" written as Optional[str]
    default: Any
    help: str
    flags: tuple[str, ...] = ()  # e.g. ("--quant", "-q"); default: --<name with dashes>
    metavar: str | None = None

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)


@dataclass(frozen=True)
class Listing:
    """What a format can make, as a table for `qwrap formats` and the docs."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""
