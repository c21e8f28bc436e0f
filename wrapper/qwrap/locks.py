"""Who may run what in an output folder, across processes and machines sharing it.

Two kinds of flock under ``OUT/.checkpoint/``, released by the kernel when the holder dies (on
NFS, when the server's lease on the dead client expires: NFSv4 lease time, about 90 s):

- ``lock``, the folder lock: a whole-plan ``qwrap run`` holds it exclusively (it removes the
  intermediates at the end, so nothing else may run beside it); ``qwrap run --step`` holds it
  shared, so any number of them run at once, on any machine.
- ``locks/<step>.lock``, one per step, held while that step runs: the same step started twice at
  once is refused (exit 14) instead of being computed twice, and a ``started`` record whose step
  lock is free was left by a dead process.

Each lock file holds its holder's pid and host, only for the messages.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LockedError
from .journal import checkpoint_dir

LOCKS_DIR = "locks"


def whoami() -> str:
    """This process as the journal and the lock files name it: pid, and the scheduler's job."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        return f"pid {os.getpid()}, slurm job {array}_{task}" if array and task else f"pid {os.getpid()}, slurm job {job}"
    run = os.environ.get("GITHUB_RUN_ID")
    if run:
        return f"pid {os.getpid()}, github run {run}/{os.environ.get('GITHUB_JOB', '')}"
    return f"pid {os.getpid()}"


def host() -> str:
    return socket.gethostname()


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def _claim(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{whoami()} on {host()}\n".encode(), 0)


@contextmanager
def folder_lock(output: Path, *, shared: bool) -> Iterator[None]:
    """The folder lock: exclusive for a whole-plan run, shared for ``--step`` runs."""
    lock_dir = checkpoint_dir(output)
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _folder_busy(output, fd, shared) from None
        if not shared:
            _claim(fd)
        yield
    finally:
        os.close(fd)


def _folder_busy(output: Path, fd: int, shared: bool) -> LockedError:
    if shared:  # only a whole-plan run holds it exclusively
        return LockedError(f"{output} is in use by a whole-plan qwrap run ({_holder(fd)})",
                           hint="Wait for it to finish (it reuses and makes every step), or choose another --output.")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return LockedError(f"{output} is in use by another qwrap ({_holder(fd)})",
                           hint="Wait for it to finish, or choose another --output folder.")
    return LockedError(f"{output} is in use by `qwrap run --step` processes (`qwrap status {output}` shows them)",
                       hint="Wait for them to finish; a plain `qwrap run` afterwards reuses every step they made.")


def _step_path(output: Path, step_id: str) -> Path:
    return checkpoint_dir(output) / LOCKS_DIR / (re.sub(r"[^A-Za-z0-9_.-]", "_", step_id) + ".lock")


class StepLock:
    """One step's lock, held from before its ``started`` record until after its last one."""

    def __init__(self, output: Path, step_id: str):
        self.path = _step_path(output, step_id)
        self.step_id = step_id
        self._fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take it; None on success, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            return holder
        _claim(fd)
        self._fd = fd
        return None

    def acquire(self) -> None:
        holder = self.try_acquire()
        if holder is not None:
            raise LockedError(f"step {self.step_id} is already running ({holder})",
                              hint="Wait for it: a later run reuses what it makes. "
                              "The same step is never run twice at once.")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def step_running(output: Path, step_id: str) -> bool:
    """Whether some live process holds the step's lock (read-only: creates nothing)."""
    try:
        fd = os.open(_step_path(output, step_id), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
