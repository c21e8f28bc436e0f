"""The randomized kill soak (issue 12), shared by tests/test_soak.py (a few kills) and
bench/soak.py (many): run a plan, SIGKILL qwrap itself or the tool or worker a step just
started, at a named moment picked at random (tests/moments.py: a step journaled as started or
done, a child started), check, rerun, again and again; every completed run must have artifacts
byte-identical to an uninterrupted run.

After every kill: no process of the tree (nor any naming the output folder) is left running,
and no file sits under a final artifact name without a journal "done" record vouching for its
size and hash. Seeded and reproducible: the moments are those the uninterrupted run's journal
records (sorted by name; with several formats, a format is drawn first, then one of its
moments), and the same seed picks the same moments and victims on any machine;
a moment that does not come in a run (a resumed run skips what is done) lets that run finish."""

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

from moments import journal_size, moments_of, until
from qwrap.journal import Journal, verify_file
from qwrap.plan import StepState


@dataclass
class Kill:
    number: int
    moment: str  # the named moment it came at (tests/moments.py)
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
    python = Path(cmd[0]).name.startswith("python")  # a llama.cpp tool's -m is its model file
    if python and "-m" in cmd and cmd.index("-m") + 1 < len(cmd):
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
    """The processes of the killed run still running once given 15 s to die: those of its tree
    (as it was just before the kill) and any other naming OUT. A tool started between that
    snapshot and the kill gets its parent-death signal with the others and needs the same
    moment to die: checked at once, it was sometimes still running (a false orphan)."""
    known = {p.pid for p in tree}
    named = [p for p in psutil.process_iter(["cmdline", "pid"])
             if p.pid not in known and str(out) in " ".join(p.info["cmdline"] or ())]
    _, alive = psutil.wait_procs([*tree, *named], timeout=15)
    return [f"{_name(p)} (pid {p.pid}{'' if p.pid in known else f', naming {out}'})" for p in alive if _running(p)]


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


def _start(model: Path, out: Path, args: Sequence[str], work: Path,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """qwrap writing its --json result and its log to files (a full pipe would stall it)."""
    result = work / "result.json"
    with result.open("wb") as stdout, (work / "qwrap.log").open("ab") as log:
        return subprocess.Popen(_argv(model, out, args), stdout=stdout, stderr=log, stdin=subprocess.DEVNULL,
                                env=env), result


def _completed(model: Path, out: Path, args: Sequence[str], work: Path,
               env: dict[str, str] | None = None) -> tuple[int, str]:
    proc, result = _start(model, out, args, work, env)
    proc.wait(timeout=3600)
    return proc.returncode, result.read_text()


def _kill_at(proc: subprocess.Popen[bytes], number: int, moment: str, child: bool, began: float, out: Path,
             since: int, finals: Sequence[str]) -> Kill | None:
    """At ``moment`` of this run (journal records from byte ``since``), SIGKILL qwrap or, at a
    child moment with ``child``, the child just started; wait for qwrap, check. None when the
    run ends before the moment."""
    found = until(out, moment, proc, timeout=3600, since=since)
    if found is None or proc.poll() is not None:
        return None
    tree = _tree(psutil.Process(proc.pid))
    victim: psutil.Process | None = psutil.Process(proc.pid)
    if child and isinstance(found, dict) and "pid" in found:
        try:
            victim = psutil.Process(int(found["pid"]))
        except psutil.NoSuchProcess:
            victim = None
    elif child and moment.startswith("layer:"):  # the worker that committed the layer
        victim = next((p for p in tree if _name(p).startswith(f"{_format(moment)}_")), None)
    kill = Kill(number, moment, _name(victim) if victim else "child (had exited)", round(time.monotonic() - began, 2))
    if victim is not None:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            kill.victim += " (had exited)"
    proc.wait(timeout=3600)
    kill.exit_code = proc.returncode
    kill.orphans = _orphans(tree, out)
    kill.unvouched = _unvouched(out, finals)
    return kill


def _format(moment: str) -> str:
    """The format a moment's step belongs to: 'awq' of 'child:awq.quantize' and of 'layer:awq'."""
    return moment.partition(":")[2].split(".", 1)[0]


def _pick(rng: random.Random, moments: Sequence[str]) -> str:
    """A moment of a format picked first, when the plan has several: AWQ's and GPTQ's six moments
    each get as many kills as GGUF's three dozen."""
    formats = sorted({_format(m) for m in moments})
    if len(formats) > 1:  # (a single format's soak draws as it always did: the same moments by seed)
        of = rng.choice(formats)
        moments = [m for m in moments if _format(m) == of]
    return rng.choice(moments)


def soak(model: Path, work: Path, args: Sequence[str], *, kills: int, seed: int,
         budget_s: float = 3600.0, env: dict[str, str] | None = None, focus: str = "") -> dict[str, Any]:
    """Up to ``kills`` kills within about ``budget_s``; the results document. ``env``: qwrap's
    environment (default ours); ``focus``: only the moments naming it (e.g. ``awq``: the
    moments of AWQ's steps and workers)."""
    rng = random.Random(seed)
    started = time.monotonic()
    code, text = _completed(model, work / "reference", args, work, env)
    if code:
        raise RuntimeError(f"the uninterrupted run failed (exit {code}): see {work / 'qwrap.log'}")
    full_s = time.monotonic() - started
    reference = _shas(text)
    found = moments_of(work / "reference")
    # a worker's layer commits: a kill mid-quantization, and again at the next layer once resumed
    layered = sorted({f"layer:{_format(m)}" for m in found if m.startswith("child:") and ".quantize" in m
                      and _format(m) != "gguf"})
    moments = [m for m in [*found, *layered] if focus in m]
    if not moments:
        raise RuntimeError(f"no moment of the uninterrupted run names {focus!r}")
    out = work / "soaked"
    done: list[Kill] = []
    pending: list[Kill] = []  # kills since the last completed run in ``out``
    completed = 0
    while len(done) + len(pending) < kills and time.monotonic() - started < budget_s:
        moment, child = _pick(rng, moments), rng.random() < 0.5
        since = journal_size(out)
        proc, result = _start(model, out, args, work, env)
        began = time.monotonic()
        kill = _kill_at(proc, len(done) + len(pending) + 1, moment, child and moment.startswith(("child:", "layer:")),
                        began, out, since, list(reference))
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
        code, text = _completed(model, out, args, work, env)
        differs = _differs(_shas(text), reference) if code == 0 else ["(the last run failed)"]
        for kill in pending:
            kill.identical, kill.differs = not differs, differs
        done += pending
        completed += 1
    by_victim: dict[str, int] = {}
    by_moment: dict[str, int] = {}
    for kill in done:
        by_victim[kill.victim] = by_victim.get(kill.victim, 0) + 1
        by_moment[kill.moment] = by_moment.get(kill.moment, 0) + 1
    return {"seed": seed, "args": list(args), "focus": focus, "uninterrupted_seconds": round(full_s, 1), "moments": moments,
            "kills": len(done), "survived": sum(k.survived for k in done), "completed_runs": completed,
            "by_victim": by_victim, "by_moment": dict(sorted(by_moment.items())), "seconds": round(time.monotonic() - started, 1),
            "failures": [asdict(k) for k in done if not k.survived], "log": [asdict(k) for k in done]}
