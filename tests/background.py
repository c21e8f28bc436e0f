"""Slow, independent work tests assert on, started before the tests ask for it and run beside
the test that is running.

Most of a slow test's time is one single-threaded child (a Python importing torch, a converter,
a worker pinned to one thread), so on these 2-core hosts one core is idle: a ``Lane`` runs
such work on it. Each test then waits for its part (``Lane.result``, ``prefetched``) and
asserts on it as it did when it ran the work itself. What the work raises (an AssertionError,
a skip or failure for a missing environment) reaches the tests that read it, not the others.

- A module fixture starts on its own lane everything its selected tests read (``selected``),
  in the order they read it.
- Work a module registers with ``prefetch`` (a module-level call: it runs at collection) starts
  on the session's lane (conftest's ``session_lane``) as the session starts, in the order the
  modules are collected, when one of its tests is selected; its fixtures read it with
  ``prefetched`` (which computes it then, if it was not started).

A lane never makes a test wait for work queued behind other work: a test that asks for work
its lane has not started yet takes it off the lane and does it itself (``Lane.result``), so
registering work early costs nothing when the lane falls behind.

Work on a lane never depends on the process environment of the test running beside it (tests
monkeypatch HF_HOME and more): it runs children with the environment its lane was made with
(also when a test took it over)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


class Lane:
    def __init__(self, home: Path, workers: int = 1) -> None:
        """``home``: a temp folder for the children's HF_HOME (conftest's guard gives each test one)."""
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[tuple[Any, ...], Future[Any]] = {}
        self.work: dict[tuple[Any, ...], tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.lock = threading.Lock()
        self.cleanups: list[Callable[[], object]] = []  # run when the lane closes, last first
        # for the children of the work (see the module's docstring)
        self.env = {**os.environ, "HF_HOME": str(home / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                    "HF_HUB_OFFLINE": "1"}

    def start(self, key: tuple[Any, ...], fn: Callable[..., Any], *args: Any) -> None:
        with self.lock:
            if key not in self.futures:
                self.work[key] = (fn, args)
                self.futures[key] = self.pool.submit(fn, *args)

    def result(self, *key: Any) -> Any:
        """The work's value: waited for once the lane has started it; still queued (or
        cancelled when the lane closed), done now by the thread that asks, in its place."""
        with self.lock:
            future = self.futures[key]
            taken = future.cancel()  # true only for work not started
            if taken:
                future = self.futures[key] = Future()
                future.set_running_or_notify_cancel()  # nobody else takes it
                fn, args = self.work[key]
        if taken:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # a skip or failure reaches every reader, as from the lane
                future.set_exception(exc)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        while self.cleanups:
            self.cleanups.pop()()

    def cleanup(self, fn: Callable[[], object]) -> None:
        """``fn()`` when the lane closes (the session lane: when the session ends), for what its
        work started and keeps for later work (a Slurm cluster)."""
        self.cleanups.append(fn)

    def run(self, argv: list[str], timeout: float = 1800, env: dict[str, str] | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """subprocess.run with the lane's environment (and ``env``), output captured as text."""
        return subprocess.run(argv, capture_output=True, text=True, env={**self.env, **(env or {})},
                              timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)

    def qwrap(self, *args: str, timeout: float = 1800,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``qwrap ARGS`` as conftest.run_qwrap runs it, with the lane's environment."""
        return self.run([sys.executable, "-m", "qwrap.cli", *args], timeout=timeout, env=env)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        """A child with the lane's environment, its output piped as text."""
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, stdin=subprocess.DEVNULL, **kwargs)


@contextmanager
def lane(home: Path, workers: int = 1) -> Iterator[Lane]:
    started = Lane(home, workers)
    try:
        yield started
    finally:
        started.close()


# Session-wide results (conftest's shared runs) by name: computed once, by the fixture that asks
# first, or earlier on a lane (share: the lane that has it).
_SHARED: dict[str, Future[Any] | Lane] = {}


def shared(name: str, compute: Callable[[], Any]) -> Any:
    """The session's ``name``: what a lane started for it (``share``; taken over when still
    queued there), else ``compute()``."""
    if name not in _SHARED:
        done: Future[Any] = Future()
        try:
            done.set_result(compute())
        except BaseException as exc:
            done.set_exception(exc)
        _SHARED[name] = done
    known = _SHARED[name]
    return known.result("shared", name) if isinstance(known, Lane) else known.result()


def share(on: Lane, name: str, compute: Callable[..., Any], *args: Any) -> None:
    """Start the session's ``name`` on ``on`` unless it is started or known already."""
    if name not in _SHARED:
        on.start(("shared", name), compute, *args)
        _SHARED[name] = on


@dataclass(frozen=True)
class Prefetch:
    name: str
    compute: Callable[..., Any]  # compute(*needs, lane, folder)
    needs: tuple[str, ...]  # session-scoped fixtures
    module: str | None  # read by these tests of this module (all of them when ``tests`` is empty) ...
    tests: frozenset[str]
    fixture: str | None  # ... or by every test that uses this fixture
    last: bool  # queued after all the other work (see prefetch)

    def read_by(self, item: pytest.Item) -> bool:
        if self.fixture is not None and self.fixture in getattr(item, "fixturenames", ()):
            return True
        module = getattr(item, "module", None)
        return (module is not None and module.__name__ == self.module
                and (not self.tests or getattr(item, "originalname", item.name) in self.tests))


_PREFETCH: dict[str, Prefetch] = {}


def prefetch(module: str | None, name: str, compute: Callable[..., Any], needs: tuple[str, ...] = (),
             tests: tuple[str, ...] = (), fixture: str | None = None, last: bool = False) -> None:
    """Register ``compute(*needs, lane, folder)`` (``needs``: session-scoped fixtures by name)
    as the session's ``name``, for the session lane (see the module's docstring); it is read
    by the ``tests`` of ``module`` (all of them when none are named), or by the tests that use
    ``fixture``. ``last``: queued after every other work, so that its test (which would
    otherwise wait for it behind the lane's earlier work) takes it over and does it itself
    while the lane goes on with the work of the tests after it: for work read right after
    other long work of the lane."""
    _PREFETCH[name] = Prefetch(name, compute, needs, module, frozenset(tests), fixture, last)


def start_prefetching(request: pytest.FixtureRequest, on: Lane, root: Path) -> None:
    """Start every registered work a selected test reads, in the order the tests read them
    (``last`` work after the rest)."""
    items = request.session.items
    first = {p.name: next((i for i, item in enumerate(items) if p.read_by(item)), None) for p in _PREFETCH.values()}
    for p in sorted((p for p in _PREFETCH.values() if first[p.name] is not None),
                    key=lambda p: (p.last, first[p.name] or 0)):
        values = [fixture_or_outcome(request, n) for n in p.needs]
        share(on, p.name, needing(values, p.compute), on, folder(root / p.name))


def prefetched(request: pytest.FixtureRequest, name: str) -> Any:
    """The session's ``name`` (registered with ``prefetch``): from the session lane, or computed
    now (on a lane that only lends its environment) when it was not started."""
    p = _PREFETCH[name]

    def now() -> Any:
        values = [request.getfixturevalue(n) for n in p.needs]
        root = request.getfixturevalue("tmp_path_factory").mktemp(name)
        return p.compute(*values, Lane(root), folder(root / "work"))

    return shared(name, now)


def selected(request: pytest.FixtureRequest) -> set[str]:
    """The names (without parameters) of this module's tests that this session runs."""
    return {getattr(item, "originalname", item.name) for item in request.session.items
            if getattr(item, "module", None) is request.module}


def fixture_or_outcome(request: pytest.FixtureRequest, name: str) -> Any:
    """A fixture's value, or the skip/failure that getting it raised (for the work that needs it
    to raise in the tests that read that work)."""
    try:
        return request.getfixturevalue(name)
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        return exc


def needing(values: list[Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(*values, *args)``, raising first any outcome among ``values`` (fixture_or_outcome)."""

    def run(*args: Any) -> Any:
        for value in values:
            if isinstance(value, BaseException):
                raise value
        return fn(*values, *args)

    return run


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
