"""The only module that starts processes.

Every child gets: stdin closed, its own session (so Ctrl-C at the terminal reaches
qwrap only, and qwrap decides how to stop the child), a parent-death signal (so a
SIGKILLed qwrap does not leave tools running), an explicitly built environment, and
stdout+stderr merged into one stream that is (a) appended raw to a per-step log file
and (b) split on ``\\n`` *and* ``\\r`` into lines for progress parsers, so tqdm-style
redraws arrive as lines. Workers may also write JSON events to a separate pipe whose
fd number they find in ``QWRAP_EVENT_FD``.

While a child runs, the whole process tree is sampled with psutil for peak RSS.
Stopping escalates interrupt -> terminate -> kill against deadlines.
"""

from __future__ import annotations

import collections
import ctypes
import os
import pty
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import psutil

EVENT_FD_VAR = "QWRAP_EVENT_FD"

# Variables never passed to children. Tokens: children never talk to the Hub (the parent
# downloads), so they have no use for them and cannot leak them into logs.
# PYTHONHOME/PYTHONPATH/VIRTUAL_ENV of the parent would confuse another venv's Python.
ENV_BLOCKLIST = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_API_TOKEN",
    "PYTHONHOME",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONSTARTUP",
)

SAMPLE_INTERVAL_S = 0.25  # how often the loop wakes (deadlines, signals)
RSS_INTERVAL_S = 0.5  # memory samples: one /proc read per process in the tree
TREE_INTERVAL_S = 1.0  # finding new descendants scans all of /proc: less often
EXIT_POLL_S = 0.01  # how often to look for the exit of a child whose output just closed
TAIL_LINES = 400

LineCallback = Callable[[str], None]
EventCallback = Callable[[str], None]


@dataclass(frozen=True)
class StopPolicy:
    """Deadlines for interrupt -> terminate -> kill."""

    interrupt_grace_s: float = 5.0
    terminate_grace_s: float = 5.0


@dataclass(frozen=True)
class ProcessResult:
    argv: tuple[str, ...]
    returncode: int
    seconds: float
    peak_rss_bytes: int
    log_path: Path | None
    tail: tuple[str, ...]
    stalled: bool = False
    timed_out: bool = False
    stopped_by_signal: int | None = None  # a signal qwrap itself forwarded (Ctrl-C, SIGTERM)
    oom_killed: bool = False  # the kernel's OOM killer fired in our cgroup during the run

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def killed_by(self) -> int | None:
        """The signal that ended the child, if it died from one."""
        return -self.returncode if self.returncode < 0 else None


@dataclass
class _Running:
    """Bookkeeping for one child while it runs."""

    proc: subprocess.Popen[bytes]
    log: IO[bytes] | None
    on_line: LineCallback | None
    on_event: EventCallback | None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    peak_rss: int = 0
    tree: list[psutil.Process] = field(default_factory=list)
    tree_at: float = -1e9
    rss_at: float = -1e9
    last_output: float = field(default_factory=time.monotonic)
    buffers: dict[int, bytes] = field(default_factory=dict)


class _StopRequest:
    """A stop every running supervision loop obeys, in any thread: the runner's main thread sets
    it when Ctrl-C/SIGTERM arrives while several steps run (only the main thread gets signals)."""

    def __init__(self) -> None:
        self.signum: int | None = None


STOP = _StopRequest()


def request_stop(signum: int) -> None:
    """Stop every child now running (interrupt -> terminate -> kill) and start no new one."""
    if STOP.signum is None:
        STOP.signum = signum


def clear_stop() -> None:
    STOP.signum = None


class _SignalLatch:
    """Turns SIGINT/SIGTERM into a flag the supervision loop acts on (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[_SignalLatch]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def child_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """A copy of our environment minus the blocklist; ``None`` in overrides unsets."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_BLOCKLIST}
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


# Loaded once here, not in the forked child: the runner starts children from several threads,
# and between fork and exec the child must not take locks (dlopen's) another thread may hold.
_LIBC = _load_libc()


def _set_parent_death_signal(parent: int) -> None:
    """In the child before exec: die with SIGKILL when qwrap (pid ``parent``) dies (Linux
    prctl). The signal fires when the *thread* that started the child ends; supervising threads
    outlive their children, so that is when qwrap dies. A qwrap killed between the fork and the
    prctl sends no signal: the child, already given to another parent, ends itself."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _reap(run: _Running) -> int | None:
    """Like Popen.poll(), but through wait4 so that the kernel's own peak RSS of the child
    is kept: exact even for tools that finish between two samples."""
    proc = run.proc
    if proc.returncode is None:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return proc.poll()
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            run.peak_rss = max(run.peak_rss, usage.ru_maxrss * 1024)
    return proc.returncode


def _sample(run: _Running, now: float) -> None:
    """Peak RSS of the whole tree, cheaply: the process list is refreshed every few
    seconds, the RSS of known processes twice a second (the parent shares the CPUs)."""
    if now - run.rss_at < RSS_INTERVAL_S:
        return
    if now - run.tree_at >= TREE_INTERVAL_S:
        run.tree = _tree(run.proc.pid)
        run.tree_at = now
    run.rss_at = now
    run.peak_rss = max(run.peak_rss, _rss(run.tree))


def _signal_group(pid: int, signum: int) -> None:
    """Signal the child's process group and any descendants that left it."""
    procs = _tree(pid)
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    for p in procs[1:]:
        try:
            p.send_signal(signum)
        except psutil.Error:
            pass


def _wait(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def stop_tree(proc: subprocess.Popen[bytes], policy: StopPolicy, first: int = signal.SIGINT) -> None:
    """interrupt -> terminate -> kill, each after its grace period."""
    for signum, grace in (
        (first, policy.interrupt_grace_s),
        (signal.SIGTERM, policy.terminate_grace_s),
    ):
        if proc.poll() is not None:
            break
        _signal_group(proc.pid, signum)
        if _wait(proc, grace):
            break
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers left in the group


def reap_orphans(pid: int, create_time: float) -> bool:
    """Kill a process group left by a qwrap that died hard (recorded in the journal).

    Matching on create time makes sure a recycled pid is never touched.
    Returns True when something was killed.
    """
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01:
            return False
    except psutil.Error:
        return False
    _signal_group(pid, signal.SIGKILL)
    return True


def _memory_cgroup_oom_kills() -> int | None:
    """The OOM-kill counter of our memory cgroup (v2 memory.events or v1 oom_control)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control"
        else:
            continue
        try:
            for entry in candidate.read_text().splitlines():
                key, _, value = entry.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def _feed(run: _Running, fd: int, data: bytes, is_event: bool) -> None:
    if not is_event:
        if run.log is not None:
            run.log.write(data)
            run.log.flush()
        run.last_output = time.monotonic()
    buf = run.buffers.get(fd, b"") + data
    parts = re.split(rb"\r\n|\n" if is_event else rb"\r\n|\r|\n", buf)
    run.buffers[fd] = parts.pop()
    for raw in parts:
        _dispatch(run, raw, is_event)


def _dispatch(run: _Running, raw: bytes, is_event: bool) -> None:
    text = raw.decode("utf-8", errors="replace")
    if is_event:
        if run.log is not None:  # the step log keeps the events too, in full
            run.log.write(b"[event] " + raw + b"\n")
            run.log.flush()
        if run.on_event is not None and text.strip():
            run.on_event(text)
        return
    text = text.rstrip()
    if not text:
        return
    run.tail.append(text)
    if run.on_line is not None:
        run.on_line(text)


def _flush_buffers(run: _Running, event_fd: int | None) -> None:
    for fd, rest in run.buffers.items():
        if rest:
            _dispatch(run, rest, fd == event_fd)
    run.buffers.clear()


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    on_line: LineCallback | None = None,
    on_event: EventCallback | None = None,
    on_start: Callable[[int, float], None] | None = None,
    use_pty: bool = False,
    stall_timeout: float | None = None,
    timeout: float | None = None,
    stop_policy: StopPolicy = StopPolicy(),
) -> ProcessResult:
    """Run ``argv`` to completion under supervision and return what happened.

    Never raises for a failing child: the caller turns a ``ProcessResult`` into the
    right error. ``on_start(pid, create_time)`` lets the caller journal the child so a
    later qwrap can reap it if this one is killed.
    """
    args = [os.fspath(a) for a in argv]
    if STOP.signum is not None:  # stopping: a child started now would only be stopped again
        return ProcessResult(tuple(args), -STOP.signum, 0.0, 0, log_path, (), stopped_by_signal=STOP.signum)
    environment = child_env(env)
    event_r = event_w = None
    if on_event is not None:
        event_r, event_w = os.pipe()
        environment[EVENT_FD_VAR] = str(event_w)
    if use_pty:
        master, slave = pty.openpty()
        out_r, out_w = master, slave
    else:
        out_r, out_w = os.pipe()
    log: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        log.write(f"\n$ {' '.join(args)}\n".encode())
        log.flush()
    oom_before = _memory_cgroup_oom_kills()
    started = time.monotonic()
    latch = _SignalLatch()
    with latch.installed():  # from before the child exists: no signal may slip past it
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                cwd=cwd,
                env=environment,
                start_new_session=True,
                pass_fds=(event_w,) if event_w is not None else (),
                preexec_fn=partial(_set_parent_death_signal, os.getpid()),  # noqa: PLW1509 - takes no lock (see _LIBC)
            )
        except OSError:
            for fd in (out_r, out_w, event_r, event_w):
                if fd is not None:
                    os.close(fd)
            if log is not None:
                log.close()
            raise
        os.close(out_w)
        if event_w is not None:
            os.close(event_w)
        if on_start is not None:
            try:
                on_start(proc.pid, psutil.Process(proc.pid).create_time())
            except psutil.Error:
                pass
        state = _Running(proc=proc, log=log, on_line=on_line, on_event=on_event)
        try:
            outcome = _supervise(state, out_r, event_r, latch, stall_timeout, timeout, stop_policy)
        except BaseException:
            stop_tree(proc, stop_policy)  # a callback raised: never leave the child behind
            raise
        finally:
            for fd in (out_r, event_r):
                if fd is not None:
                    os.close(fd)
            if log is not None:
                log.close()
    oom_after = _memory_cgroup_oom_kills()
    return ProcessResult(
        argv=tuple(args),
        returncode=proc.returncode,
        seconds=time.monotonic() - started,
        peak_rss_bytes=state.peak_rss,
        log_path=log_path,
        tail=tuple(state.tail),
        stalled=outcome == "stalled",
        timed_out=outcome == "timeout",
        stopped_by_signal=outcome if isinstance(outcome, int) else None,
        oom_killed=(
            oom_before is not None and oom_after is not None and oom_after > oom_before
            and proc.returncode == -signal.SIGKILL
        ),
    )


def _supervise(
    run: _Running,
    out_r: int,
    event_r: int | None,
    latch: _SignalLatch,
    stall_timeout: float | None,
    timeout: float | None,
    policy: StopPolicy,
) -> str | int | None:
    """The loop: read output, sample memory, enforce deadlines, forward signals."""
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, False)
    if event_r is not None:
        sel.register(event_r, selectors.EVENT_READ, True)
    started = time.monotonic()
    exited_at: float | None = None
    closed_at: float | None = None
    outcome: str | int | None = None
    # Until the child has exited *and* its output is drained: a child that closes its
    # output early is still watched for signals, stalls and deadlines.
    while sel.get_map() or _reap(run) is None:
        if not sel.get_map():
            # output closed: the child is exiting (or runs on without output). Poll briefly at
            # first so its exit is seen within milliseconds, not a sampling interval per child.
            closed_at = closed_at or time.monotonic()
            time.sleep(EXIT_POLL_S if time.monotonic() - closed_at < 1.0 else SAMPLE_INTERVAL_S)
        for key, _ in sel.select(timeout=SAMPLE_INTERVAL_S) if sel.get_map() else ():
            fd = int(key.fd)
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: pty closed by the child
                data = b""
            if data:
                _feed(run, fd, data, bool(key.data))
            else:
                sel.unregister(fd)
        now = time.monotonic()
        if _reap(run) is None:
            _sample(run, now)
        elif exited_at is None:
            exited_at = now
        elif now - exited_at > 2.0:
            break  # a grandchild holds the pipe open; the child itself is gone
        if outcome is not None or _reap(run) is not None:
            continue
        signum = latch.signum or STOP.signum
        if signum is not None:
            outcome = signum
            stop_tree(run.proc, policy, first=signal.SIGINT)
        elif stall_timeout is not None and now - run.last_output > stall_timeout:
            outcome = "stalled"
            stop_tree(run.proc, policy, first=signal.SIGTERM)
        elif timeout is not None and now - started > timeout:
            outcome = "timeout"
            stop_tree(run.proc, policy, first=signal.SIGTERM)
    if _reap(run) is None:
        run.proc.wait()
    _flush_buffers(run, event_r)
    if outcome is None and (latch.signum or STOP.signum) is not None:
        outcome = latch.signum or STOP.signum  # the signal arrived as the child was finishing
    sel.close()
    return outcome


# Ordered: the first patterns are the most telling. Used to pick what to show on failure.
RELEVANT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"not supported|not recognized|unsupported",
        r"no space left|disk full|failed to write",
        r"out of memory|cannot allocate|MemoryError|std::bad_alloc",
        r"^\w*(Error|Exception)\b|error:|\berror\b|failed",
        r"Traceback",
    )
)


def relevant_lines(tail: Sequence[str], limit: int = 12) -> list[str]:
    """The lines worth showing on failure: pattern matches first, then the last lines."""
    picked: list[str] = []
    for pattern in RELEVANT_PATTERNS:
        for line in tail:
            if pattern.search(line) and line not in picked:
                picked.append(line)
    picked = picked[-limit // 2 :] if picked else []
    for line in tail[-(limit - len(picked)) :]:
        if line not in picked:
            picked.append(line)
    return picked[-limit:]
