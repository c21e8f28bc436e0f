"""Named moments of a qwrap run, for tests (and bench/soak.py) that interrupt one: a fault is
injected when a named moment appears in the output folder (a journal record, a file), never
after a wall-clock delay, so the same test interrupts the run at the same point on any machine
and the point is in the test id.

- ``started:STEP`` / ``done:STEP`` / ``interrupted:STEP``: the journal records that state for
  the first step whose id starts with STEP (``done:gguf.validate:`` is the first validation's);
- ``child:STEP``: the journal records a child (tool or worker) started for such a step;
- ``file:GLOB``: a file matching GLOB (relative to OUT) exists;
- ``layer:FORMAT``: FORMAT's worker commits a layer checkpoint while we wait (GPTQModel's
  ``CURRENT`` or autoawq's ``layer-N.json`` written under ``.checkpoint/layers/FORMAT-*``): a
  run resumed from checkpoints comes to it at its next layer, not at once.

The kill comes a poll interval (10 ms) after the moment: the run is past the moment, and the
next moment's work has at most just begun."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

KINDS = ("started", "done", "interrupted", "child", "file", "layer")
LAYER_COMMITS = ("CURRENT", "layer-*.json")  # what a worker writes last to commit a layer


def journal_path(out: Path) -> Path:
    return out / ".checkpoint" / "journal.jsonl"


def journal_size(out: Path) -> int:
    """Where the next run's records will start (pass it as ``since``)."""
    try:
        return journal_path(out).stat().st_size
    except FileNotFoundError:
        return 0


def journal_records(out: Path, since: int = 0) -> list[dict[str, Any]]:
    """The journal's complete lines from byte ``since``, read without its lock (a line being
    written is left for the next read)."""
    try:
        with journal_path(out).open("rb") as f:
            f.seek(since)
            raw = f.read()
    except FileNotFoundError:
        return []
    records = []
    for line in raw.split(b"\n")[:-1]:  # the last piece is empty or a line still being written
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


@dataclass(frozen=True)
class Moment:
    kind: str
    what: str

    @classmethod
    def parse(cls, name: str | Moment) -> Moment:
        if isinstance(name, Moment):
            return name
        kind, _, what = name.partition(":")
        if kind not in KINDS or not what:
            raise ValueError(f"not a moment: {name!r} (KIND:WHAT, KIND one of {', '.join(KINDS)})")
        return cls(kind, what)

    def __str__(self) -> str:
        return f"{self.kind}:{self.what}"

    @property
    def step(self) -> str | None:
        return None if self.kind in ("file", "layer") else self.what

    def commits(self, out: Path) -> dict[Path, int]:
        """``layer``: the layer commits under OUT, by path, with their modification times."""
        found = {}
        for root in (out / ".checkpoint" / "layers").glob(f"{self.what}-*"):
            for folder, _, names in os.walk(root):  # (a folder the worker removes as we walk is skipped)
                for name in names:
                    if any(fnmatch.fnmatch(name, pattern) for pattern in LAYER_COMMITS):
                        path = Path(folder) / name
                        try:
                            found[path] = path.stat().st_mtime_ns
                        except FileNotFoundError:  # replaced as we looked
                            continue
        return found

    def find(self, out: Path, since: int = 0) -> dict[str, Any] | Path | None:
        """The journal record (from byte ``since``) or the file of this moment, if it has happened."""
        if self.kind == "file":
            return next(iter(sorted(out.glob(self.what))), None)
        if self.kind == "layer":
            raise ValueError("a layer moment is a commit after a point in time: wait for it with until()")
        for rec in journal_records(out, since):
            if self.kind == "child":
                if rec.get("kind") == "child" and str(rec.get("step_ref", "")).startswith(self.what):
                    return rec
            elif str(rec.get("step", "")).startswith(self.what) and rec.get("state") == self.kind:
                return rec
        return None


def moments_of(out: Path) -> list[str]:
    """Every step and child moment a finished run's journal records, sorted by name (the same
    list whatever order concurrent steps happened in)."""
    names = set()
    for rec in journal_records(out):
        if rec.get("kind") == "child":
            names.add(f"child:{rec['step_ref']}")
        elif "step" in rec and rec.get("state") in ("started", "done"):
            names.add(f"{rec['state']}:{rec['step']}")
    return sorted(names)


def until(out: Path, moment: Moment | str, proc: subprocess.Popen[Any] | None = None, timeout: float = 300,
          since: int = 0, poll: float = 0.01) -> dict[str, Any] | Path | None:
    """Block until ``moment`` happens in ``out``; None if ``proc`` ends first. Fails when
    nothing happens within ``timeout``."""
    moment = Moment.parse(moment)
    deadline = time.monotonic() + timeout
    before = moment.commits(out) if moment.kind == "layer" else {}
    while True:
        ended = proc is not None and proc.poll() is not None
        if moment.kind == "layer":
            found = next((p for p, t in moment.commits(out).items() if before.get(p) != t), None)
        else:
            found = moment.find(out, since)
        if found is not None or ended:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{moment} did not happen within {timeout} s")
        time.sleep(poll)


def wait_for(out: Path, moment: Moment | str, proc: subprocess.Popen[Any] | None = None, timeout: float = 300,
             since: int = 0) -> dict[str, Any] | Path:
    """``until``, failing if ``proc`` ends before the moment."""
    found = until(out, moment, proc, timeout, since)
    if found is None:
        assert proc is not None
        raise AssertionError(f"the run ended (exit {proc.returncode}) before {moment}")
    return found


def running_child(out: Path, step_prefix: str, proc: subprocess.Popen[Any] | None = None,
                  timeout: float = 300) -> psutil.Process:
    """The live process of the first child journaled for a step starting with ``step_prefix``."""
    rec = wait_for(out, Moment("child", step_prefix), proc, timeout)
    assert isinstance(rec, dict)
    try:
        return psutil.Process(int(rec["pid"]))
    except psutil.NoSuchProcess:
        raise AssertionError(f"the child of {rec['step_ref']} (pid {rec['pid']}) ended before it was caught: "
                             "the test model is too small for this kill") from None
