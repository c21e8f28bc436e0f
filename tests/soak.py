"""The randomized kill soak (issue 12), shared by tests/test_soak.py (a few kills) and
bench/soak.py (many): run a plan, SIGKILL a random process of qwrap's tree (qwrap itself, a
tool, a worker) at a random moment, check, rerun, again and again; every completed run must
have artifacts byte-identical to an uninterrupted run.

After every kill: no process of the tree (nor any naming the output folder) is left running,
and no file sits under a final artifact name without a journal "done" record vouching for its
size and hash. Seeded: the same seed kills the same kinds of process at the same fractions of
the run (the processes alive at that moment vary with the machine's speed)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from qwrap.journal import Journal, verify_file
from qwrap.plan import StepState


@dataclass
class Kill:
    number: int
    victim: str  # "qwrap", or the tool / worker module that was killed
    at_s: float  # seconds into the run
    exit_code: int | None = None
    orphans: list[str] = field(default_factory=list)
    unvouched: list[str] = field(default_factory=list)
    identical: bool | None = None  # the run that eventually completed matched the reference
    differs: list[str] = field(default_factory=list)  # the artifacts that did not

    @property
    def survived(self) -> bool:
        return not self.orphans and not self.unvouched and self.identical is True and self.exit_code != 1


def _argv(model: Path, out: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "qwrap.cli", "run", str(model), "-o", str(out), "--json", *args]


def _shas(stdout: str) -> dict[str, str]:
    return {Path(a["path"]).name: a["sha256"] for a in json.loads(stdout)["artifacts"]}


def _name(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline() or [proc.name()]
    except psutil.Error:
        return "gone"
    if "-m" in cmd and cmd.index("-m") + 1 < len(cmd):
        module = cmd[cmd.index("-m") + 1]
        return "qwrap" if module == "qwrap.cli" else module.rsplit(".", 1)[-1]
    script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), None)
    return script or Path(cmd[0]).name


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _orphans(tree: list[psutil.Process], out: Path) -> list[str]:
    _, alive = psutil.wait_procs(tree, timeout=15)
    left = [f"{_name(p)} (pid {p.pid})" for p in alive if _running(p)]
    for p in psutil.process_iter(["cmdline", "pid"]):
        if p.pid not in {q.pid for q in tree} and str(out) in " ".join(p.info["cmdline"] or ()) and _running(p):
            left.append(f"{_name(p)} (pid {p.pid}, naming {out})")
    return left


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _unvouched(out: Path, finals: Sequence[str]) -> list[str]:
    """Final artifact names present without a 'done' record whose size and hash they match."""
    states = Journal(out).states() if (out / ".checkpoint" / "journal.jsonl").exists() else {}
    vouched = [o for st in states.values() if st.state is StepState.DONE for o in st.outputs]
    bad = []
    for name in finals:
        if (out / name).exists():
            entries = [o for o in vouched if o.get("path") == name]
            if not any(verify_file(o, out) for o in entries):
                bad.append(name)
    return bad


def _differs(got: dict[str, str], reference: dict[str, str]) -> list[str]:
    return sorted(name for name in {*got, *reference} if got.get(name) != reference.get(name))


def _start(model: Path, out: Path, args: Sequence[str], work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """qwrap writing its --json result and its log to files (a full pipe would stall it)."""
    result = work / "result.json"
    with result.open("wb") as stdout, (work / "qwrap.log").open("ab") as log:
        return subprocess.Popen(_argv(model, out, args), stdout=stdout, stderr=log, stdin=subprocess.DEVNULL), result


def _completed(model: Path, out: Path, args: Sequence[str], work: Path) -> tuple[int, str]:
    proc, result = _start(model, out, args, work)
    proc.wait(timeout=3600)
    return proc.returncode, result.read_text()


def _kill_some(proc: subprocess.Popen[bytes], number: int, pick: float, began: float, out: Path,
               finals: Sequence[str]) -> Kill | None:
    """SIGKILL the process at ``pick`` (0..1) along qwrap's tree, wait for qwrap, check."""
    tree = _tree(psutil.Process(proc.pid))
    if not tree:
        return None
    victim = tree[min(len(tree) - 1, int(pick * len(tree)))]
    kill = Kill(number, _name(victim), round(time.monotonic() - began, 2))
    try:
        victim.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        kill.victim += " (had exited)"
    proc.wait(timeout=3600)
    kill.exit_code = proc.returncode
    kill.orphans = _orphans(tree, out)
    kill.unvouched = _unvouched(out, finals)
    return kill


def soak(model: Path, work: Path, args: Sequence[str], *, kills: int, seed: int,
         budget_s: float = 3600.0) -> dict[str, Any]:
    """Up to ``kills`` kills within about ``budget_s``; the results document."""
    rng = random.Random(seed)
    started = time.monotonic()
    code, text = _completed(model, work / "reference", args, work)
    if code:
        raise RuntimeError(f"the uninterrupted run failed (exit {code}): see {work / 'qwrap.log'}")
    full_s = time.monotonic() - started
    reference = _shas(text)
    out = work / "soaked"
    done: list[Kill] = []
    pending: list[Kill] = []  # kills since the last completed run in ``out``
    completed = 0
    while len(done) + len(pending) < kills and time.monotonic() - started < budget_s:
        proc, result = _start(model, out, args, work)
        began = time.monotonic()
        fraction, pick = rng.random(), rng.random()
        try:
            proc.wait(timeout=max(0.05, fraction * full_s))
        except subprocess.TimeoutExpired:
            kill = _kill_some(proc, len(done) + len(pending) + 1, pick, began, out, list(reference))
            if kill is not None:
                pending.append(kill)
        proc.wait(timeout=3600)
        if proc.returncode == 0:  # a completed run: it must match, whatever was killed before it
            differs = _differs(_shas(result.read_text()), reference)
            for kill in pending:
                kill.identical, kill.differs = not differs, differs
            done += pending
            pending = []
            completed += 1
            shutil.rmtree(out)  # the next round starts from nothing
    if pending:  # finish the last round without a kill
        code, text = _completed(model, out, args, work)
        differs = _differs(_shas(text), reference) if code == 0 else ["(the last run failed)"]
        for kill in pending:
            kill.identical, kill.differs = not differs, differs
        done += pending
        completed += 1
    by_victim: dict[str, int] = {}
    for kill in done:
        by_victim[kill.victim] = by_victim.get(kill.victim, 0) + 1
    return {"seed": seed, "args": list(args), "uninterrupted_seconds": round(full_s, 1),
            "kills": len(done), "survived": sum(k.survived for k in done), "completed_runs": completed,
            "by_victim": by_victim, "seconds": round(time.monotonic() - started, 1),
            "failures": [asdict(k) for k in done if not k.survived], "log": [asdict(k) for k in done]}
