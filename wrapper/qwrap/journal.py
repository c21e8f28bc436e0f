"""The step journal under ``<output>/.checkpoint/``: append-only, fsync'd, schema-versioned.

One JSON object per line, one line per state change. The state of a step is its last
record. A crash can only truncate the *last* line; that is ignored with a warning.
Anything else unreadable is a JournalError naming the file. JSON only: no pickle.

Several processes, on one machine or on several sharing the folder, may write it at once
(``qwrap run --step``): each append takes an exclusive flock on ``journal.lock`` for the few
microseconds of repair + write + fsync, and each read a shared one, so lines never interleave
and a reader never sees half a line. The locks that decide who may run what live in
``locks.py``. Also here: file fingerprints (size + sha256 for outputs; size + mtime + hash of
small files for source models).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from .errors import JournalError
from .outpaths import is_plain_relative
from .plan import StepState

SCHEMA = 1
CHECKPOINT_DIR = ".checkpoint"
JOURNAL_FILE = "journal.jsonl"
JOURNAL_LOCK = "journal.lock"
SMALL_FILE = 1 << 20  # source files below this size are hashed, larger ones use size+mtime

log = logging.getLogger(__name__)
_APPEND_LOCK = threading.Lock()


def checkpoint_dir(output: Path) -> Path:
    return output / CHECKPOINT_DIR


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def sha256_path(path: Path) -> str:
    """A file's sha256; for a folder (AWQ/GPTQ artifacts), the hash of its files' names and hashes."""
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        digest.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


_HASHED: dict[tuple[int, int, int, int], str] = {}


def _hash_once(path: Path) -> str:
    """sha256 of a file, remembered by (device, inode, size, mtime) so that a file renamed
    by a later step in the same run is not read twice."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def describe_file(path: Path, base: Path) -> OutputEntry:
    """What a 'done' record says about an output (file or folder): enough to re-verify it.

    Deliverables get a content hash. Scratch files under ``.checkpoint/work/`` (the 16-bit
    intermediate, the imatrix), which only qwrap touches, are pinned by size and mtime:
    hashing a multi-GB intermediate would cost seconds on every run for nothing.
    """
    rel = os.path.relpath(path, base)
    if rel.startswith(f"{CHECKPOINT_DIR}/work/") and path.is_file():
        st = path.stat()
        return {"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = _hash_once(path) if path.is_file() else sha256_path(path)
    return {"path": rel, "bytes": _size(path), "sha256": digest}


def verify_file(entry: OutputEntry, base: Path) -> bool:
    if not is_plain_relative(entry.get("path")):  # type: ignore[arg-type]  # "../x" in a crafted journal
        return False
    path = base / entry["path"]
    try:
        if _size(path) != entry["bytes"]:
            return False
        if "mtime_ns" in entry:
            return path.stat().st_mtime_ns == entry["mtime_ns"]
    except OSError:
        return False
    return sha256_path(path) == entry["sha256"]


def fingerprint_tree(root: Path) -> str:
    """A source model's fingerprint: every file's name and size, mtime for big files,
    content hash for small ones (config, tokenizer), so edits there are always seen."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts):
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0".encode())
        if st.st_size < SMALL_FILE:
            digest.update(sha256_file(path).encode())
        else:
            digest.update(str(st.st_mtime_ns).encode())
    return digest.hexdigest()


class OutputEntry(TypedDict, total=False):
    """What a 'done' record says about one output: enough to re-verify it."""

    path: str  # relative to the output folder
    bytes: int
    sha256: str  # deliverables
    mtime_ns: int  # scratch files under .checkpoint/work/, pinned by size and mtime


@dataclass(frozen=True)
class StepRecord:
    """One state change of one step (the state of a step is its last record)."""

    step: str
    state: StepState
    fingerprint: str
    outputs: tuple[OutputEntry, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)  # the facts the step returned
    seconds: float | None = None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    error: str | None = None
    error_type: str | None = None
    log: str | None = None
    t: float | None = None
    host: str | None = None  # the machine that ran it
    by: str | None = None  # who ran it there: pid, and the scheduler's job id if any

    @classmethod
    def from_json(cls, r: Mapping[str, Any]) -> StepRecord:
        return cls(str(r["step"]), StepState(r["state"]), str(r.get("fingerprint", "")),
                   tuple(r.get("outputs") or ()), dict(r.get("info") or {}), r.get("seconds"),
                   int(r.get("peak_rss_bytes") or 0), int(r.get("peak_gpu_bytes") or 0), r.get("error"),
                   r.get("error_type"), r.get("log"), r.get("t"), r.get("host"), r.get("by"))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.step, "state": self.state.value, "fingerprint": self.fingerprint}
        if self.host is not None:
            data.update(host=self.host, by=self.by)
        if self.state is StepState.DONE:
            data.update(outputs=list(self.outputs), info=dict(self.info), seconds=self.seconds,
                        peak_rss_bytes=self.peak_rss_bytes, peak_gpu_bytes=self.peak_gpu_bytes)
        elif self.state in (StepState.FAILED, StepState.INTERRUPTED):
            data.update(error=self.error, error_type=self.error_type, seconds=self.seconds)
            if self.log:
                data["log"] = self.log
        return data


@dataclass(frozen=True)
class ChildRecord:
    """A child process started for a step, so a later run can reap it if qwrap was killed."""

    step: str
    pid: int
    create_time: float
    host: str | None = None  # pids mean something only on the machine that recorded them


class Journal:
    def __init__(self, output: Path):
        self.output = output
        self.dir = checkpoint_dir(output)
        self.path = self.dir / JOURNAL_FILE
        self.warnings: list[str] = []

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        """flock on journal.lock: exclusive to append, shared to read (across processes and
        machines; the thread lock orders this process's own threads)."""
        if mode == fcntl.LOCK_EX:
            self.dir.mkdir(parents=True, exist_ok=True)
        elif not self.dir.is_dir():
            yield
            return
        fd = os.open(self.dir / JOURNAL_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- reading -------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with _APPEND_LOCK, self._locked(fcntl.LOCK_SH):
            raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        out: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
                is_last = all(not rest.strip() for rest in lines[number:])
                if is_last and not raw.endswith(b"\n"):
                    msg = f"ignored a truncated last line in {self.path} (a crash mid-write)"
                    self.warnings.append(msg)
                    log.warning(msg)
                    continue
                raise JournalError(
                    f"{self.path} line {number} is not valid journal JSON ({exc})",
                    hint=f"Move {self.dir} aside to start this output folder afresh.",
                ) from exc
            version = record.get("v", SCHEMA)
            if not isinstance(version, int):
                raise JournalError(f"{self.path} line {number} has a schema version qwrap cannot read ({version!r})",
                                   hint=f"Move {self.dir} aside to start this output folder afresh.")
            if version > SCHEMA:
                raise JournalError(
                    f"{self.path} was written by a newer qwrap (schema {record.get('v')})",
                    hint="Upgrade qwrap, or use another --output folder.",
                )
            out.append(record)
        return out

    def states(self) -> dict[str, StepRecord]:
        """Every step's last record."""
        states: dict[str, StepRecord] = {}
        for r in self.records():
            if "step" in r:
                try:
                    states[r["step"]] = StepRecord.from_json(r)
                except (KeyError, ValueError, TypeError, OverflowError) as exc:
                    raise JournalError(f"{self.path} has a step record qwrap cannot read ({exc!r}): {r}",
                                       hint=f"Move {self.dir} aside to start this output folder afresh.") from exc
        return states

    def children(self) -> list[ChildRecord]:
        try:
            return [ChildRecord(str(r["step_ref"]), int(r["pid"]), float(r["create_time"]), r.get("host"))
                    for r in self.records() if r.get("kind") == "child"]
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise JournalError(f"{self.path} has a child-process record qwrap cannot read ({exc!r})",
                               hint=f"Move {self.dir} aside to start this output folder afresh.") from exc

    def run_header(self) -> dict[str, Any] | None:
        header = None
        for r in self.records():
            if r.get("kind") == "run":
                header = r
        return header

    def history(self, step: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.records() if r.get("step") == step)

    # -- writing -------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """One line, written whole and fsync'd, under the journal's exclusive lock: lines of
        several steps and several processes never interleave (O_APPEND alone is not atomic on
        NFS)."""
        line = json.dumps({"v": SCHEMA, "t": round(time.time(), 3), **record}, sort_keys=True)
        with _APPEND_LOCK, self._locked(fcntl.LOCK_EX):
            self._repair_tail()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)

    def record(self, rec: StepRecord) -> None:
        self.append(rec.to_json())

    def child(self, rec: ChildRecord) -> None:
        self.append({"kind": "child", "step_ref": rec.step, "pid": rec.pid, "create_time": rec.create_time,
                     "host": rec.host})

    def _repair_tail(self) -> None:
        """Cut a truncated last line so that the next record starts on a line of its own."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            os.fsync(f.fileno())


def outputs_verified(entries: Iterable[OutputEntry], base: Path) -> bool:
    return all(verify_file(e, base) for e in entries)
