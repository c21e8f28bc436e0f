"""Everything qwrap writes, renames or deletes stays inside the output folder.

The output folder itself is resolved once (a symlinked OUT is the user's choice); below it,
qwrap never goes through a symbolic link and never follows ``..``: a pre-existing link at an
artifact name, its ``.partial`` name, ``.checkpoint`` or a folder in it would make a tool write
(or ``rmtree`` delete) wherever the link points. Such a layout is refused before anything is
written, naming the link; paths read back from the journal are used only when they are plain
relative paths inside the folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import OutputPathError

CHECKPOINT = ".checkpoint"
# the folders and files a run keeps under OUT besides the plan's own outputs
FIXED = (CHECKPOINT, f"{CHECKPOINT}/journal.jsonl", f"{CHECKPOINT}/lock", f"{CHECKPOINT}/logs",
         f"{CHECKPOINT}/logs/libraries", f"{CHECKPOINT}/jobs", f"{CHECKPOINT}/work", f"{CHECKPOINT}/layers",
         "README.md", ".README.md.partial", "quality.html", "quality.png")


def is_plain_relative(rel: str) -> bool:
    """``rel`` names something inside a folder: relative, no ``..``, no empty or ``.`` parts."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not PurePosixPath(rel).is_absolute() and all(p not in ("..", ".", "") for p in parts) and \
        rel == "/".join(parts)


def _link_on_the_way(output: Path, rel: str) -> Path | None:
    """The first symbolic link from ``output`` (exclusive) down to ``output/rel`` (inclusive)."""
    here = output
    for part in PurePosixPath(rel).parts:
        here = here / part
        if here.is_symlink():
            return here
        if not here.exists():
            return None
    return None


def check(output: Path, rels: Iterable[str]) -> None:
    """Raise OutputPathError for the first of ``rels`` (paths qwrap will write under
    ``output``) that is not plain or that a symbolic link would send elsewhere."""
    for rel in rels:
        if not is_plain_relative(rel):
            raise OutputPathError(f"qwrap was asked to write {rel!r}, which is not a path inside {output}",
                                  hint="This is a bug or a crafted plan/journal: choose another --output.")
        link = _link_on_the_way(output, rel)
        if link is not None:
            raise OutputPathError(
                f"{link} is a symbolic link (to {os.readlink(link)}): qwrap writes only inside the output "
                "folder and never through a link",
                hint=f"Remove the link (`rm {link}`) or choose another --output, then run the same command again.")


def written_by(outputs: Iterable[str], scratch: Iterable[str]) -> list[str]:
    """What a step may write: its outputs, their ``.partial`` names, its scratch folders."""
    rels: list[str] = []
    for rel in outputs:
        rels += [rel, rel if rel.endswith(".partial") else rel + ".partial"]
    return rels + list(scratch)
