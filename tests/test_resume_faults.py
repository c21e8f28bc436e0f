"""Issue 3: kill anything at any moment, rerun, lose nothing; every fault is explained.

Real processes throughout: qwrap runs as a subprocess, the tools are the pinned llama.cpp
binaries and converter, faults are real signals, a real memory cgroup and a real tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from background import Lane, fixture_or_outcome, lane, needing, selected
from conftest import Run, calibration_sample, qwrap_argv, run_qwrap
from moments import running_child, wait_for
from qwrap.journal import Journal, sha256_file
from qwrap.plan import StepState
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow
QUANTS = ("Q4_K_M", "Q8_0", "Q5_K_S")


@pytest.fixture(scope="module")
def medium_model(named_model: Callable[[str], Path]) -> Path:
    """Big enough (~60M parameters) that each tool runs for a few seconds."""
    return named_model("medium")


MEDIUM_TESTS = {"test_interrupt_and_terminate", "test_sigkill_of_qwrap_while_several_children_run",
                "test_sigkill_of_one_tool_while_others_run_then_resume_is_identical",
                "test_second_qwrap_on_same_output_is_refused"}


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lane]:
    """The medium model's conversion the medium runs start from (``converted``), its
    uninterrupted run (``reference``), the runs of the test of what changes rerun, and the GPTQ
    test's three runs, started on a second lane (background.py) when the module's first test
    starts, in the order the tests read them: the tests that kill GGUF runs spend much of their
    time in one thread, the GPTQ worker runs on one thread. (One lane, not two: llama.cpp's
    tools spin-wait for their threads, so two multi-threaded runs beside the test's own are
    slower than one.)"""
    names = selected(request)
    root = tmp_path_factory.mktemp("background")
    with lane(root) as on:
        if names & MEDIUM_TESTS:
            needs = [fixture_or_outcome(request, name) for name in ("medium_model", "toolchain")]
            on.start(("converted",), needing(needs, _converted), on, root / "converted")
            on.start(("reference",), needing(needs, _reference), on, root / "reference")
        if "test_changes_rerun_exactly_what_they_affect" in names:
            needs = [fixture_or_outcome(request, name) for name in ("tiny_model", "corpus", "toolchain")]
            on.start(("changes",), needing(needs, _changed_runs), on, root / "changes")
        if "test_ctrl_c_in_the_gptq_worker_and_sigterm_in_its_evaluation" in names:
            needs = [fixture_or_outcome(request, name) for name in ("tiny_model", "corpus")]
            on.start(("gptq",), needing(needs, _gptq_interrupted_twice), on, root / "gptq")
        yield on


def _converted(model: Path, _: Toolchain, on: Lane, out: Path) -> Path:
    """The medium plan's folder with its conversion done and nothing else (``run --step``)."""
    proc = on.qwrap("run", str(model), "-o", str(out), *qargs(), "--step", "gguf.convert")
    assert proc.returncode == 0, proc.stderr
    assert {r["step"]: r["state"] for r in Journal(out).records() if "step" in r} == {"gguf.convert": "done"}
    return out


@pytest.fixture(scope="module")
def converted(background: Lane) -> Path:
    """The medium model converted (a folder to copy): each test that interrupts a medium run
    starts it from a copy, so the run goes straight to its quantizations (several tools at
    once, seconds each); the conversion itself is interrupted in the tiny model's tests."""
    return Path(background.result("converted"))


def _reference(model: Path, _: Toolchain, on: Lane, out: Path) -> dict[str, str]:
    proc = on.qwrap("run", str(model), "-o", str(out), *qargs(), "--json")
    assert proc.returncode == 0, proc.stderr
    return {a["quant"]: a["sha256"] for a in json.loads(proc.stdout)["artifacts"]}


@pytest.fixture(scope="module")
def reference(background: Lane) -> dict[str, str]:
    """sha256 of each artifact from one uninterrupted run of the medium model (from nothing)."""
    return background.result("reference")


def qargs(quants: tuple[str, ...] = QUANTS) -> list[str]:
    return [arg for q in quants for arg in ("-q", q)]


def start(model: Path, out: Path, converted: Path, *extra: str) -> subprocess.Popen[str]:
    """The medium run, in a copy of ``converted``: its conversion done, its quantizations next."""
    shutil.copytree(converted, out)
    return subprocess.Popen(qwrap_argv("run", str(model), "-o", str(out), *qargs(), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def finish(out: Path, model: Path, *extra: str) -> dict:
    proc = run_qwrap("run", str(model), "-o", str(out), *qargs(), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def shas(result: dict) -> dict[str, str]:
    return {a["quant"]: a["sha256"] for a in result["artifacts"]}


def no_partial_finals(out: Path) -> None:
    for path in out.glob("*.gguf"):
        assert path.read_bytes()[:4] == b"GGUF"
    states = Journal(out).states()
    for quant in QUANTS:
        final = out / f"medium-{quant}.gguf"
        if final.exists():
            assert states[f"gguf.validate:{quant}"].state == "done"


def unvouched_partials(out: Path) -> list[Path]:
    """Partial files no 'done' record vouches for (a resume could not trust them)."""
    vouched = {o["path"] for st in Journal(out).states().values() if st.state is StepState.DONE for o in st.outputs}
    return [p for p in out.glob("*.partial") if p.name not in vouched]


def test_sigkill_of_qwrap_leaves_no_orphan_and_resumes(tiny_model: Path, tmp_path: Path, gguf_run: Run) -> None:
    """SIGKILL qwrap while its converter runs (seconds: it imports torch)."""
    out = tmp_path / "o"
    quants = ("Q4_K_M", "Q8_0")
    proc = subprocess.Popen(qwrap_argv("run", str(tiny_model), "-o", str(out), *qargs(quants)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    child = running_child(out, "gguf.convert", proc)
    proc.kill()
    proc.communicate()
    child.wait(timeout=10)  # died with its parent (PR_SET_PDEATHSIG), not left running
    assert Journal(out).states()["gguf.convert"].state == "started"
    result = finish_tiny(out, tiny_model, quants=quants)
    states = [r["state"] for r in Journal(out).history("gguf.convert")]
    assert states[:3] == ["started", "interrupted", "started"]
    assert shas(result) == gguf_run.shas()


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_and_terminate(medium_model: Path, tmp_path: Path, signum: int, code: int,
                                 converted: Path, reference: dict[str, str]) -> None:
    out = tmp_path / "o"
    proc = start(medium_model, out, converted)
    child = running_child(out, "gguf.quantize:Q4_K_M", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    states = Journal(out).states()
    assert states["gguf.quantize:Q4_K_M"].state == "interrupted"
    # every step that was running beside it was stopped too, and says so
    assert not [name for name, st in states.items() if st.state is StepState.STARTED]
    assert not [c for c in Journal(out).children() if psutil.pid_exists(c.pid)
                and psutil.Process(c.pid).status() != psutil.STATUS_ZOMBIE]
    assert not unvouched_partials(out)
    no_partial_finals(out)
    assert shas(finish(out, medium_model)) == reference


def test_stall_is_detected(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    # The converter prints nothing while torch imports (seconds): a 0.5 s limit trips.
    out = tmp_path / "o"
    proc = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q8_0", "--stall-timeout", "0.5")
    assert proc.returncode == 13, proc.stderr
    assert "--stall-timeout" in proc.stderr
    assert Journal(out).states()["gguf.convert"].state == "failed"


def test_modified_or_deleted_artifact_is_rebuilt(tiny_model: Path, tmp_path: Path, gguf_run: Run) -> None:
    out = tmp_path / "o"
    shutil.copytree(gguf_run.out, out)  # a finished run (the journal's paths are relative to its folder)
    first = gguf_run.shas()
    q8 = out / "tiny-llama-Q8_0.gguf"
    data = bytearray(q8.read_bytes())
    data[-1] ^= 0xFF
    q8.write_bytes(bytes(data))
    (out / "tiny-llama-Q4_K_M.gguf").unlink()
    again = finish_tiny(out, tiny_model, "--force")
    steps = {s["id"]: s["state"] for s in again["steps"]}
    assert steps["gguf.quantize:Q8_0"] == "done" and steps["gguf.quantize:Q4_K_M"] == "done"
    assert shas(again) == first


def finish_tiny(out: Path, model: Path, *extra: str, quants: tuple[str, ...] = ("Q4_K_M", "Q8_0")) -> dict:
    proc = run_qwrap("run", str(model), "-o", str(out), *qargs(quants), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _changed_runs(model: Path, corpus: Path, _: Toolchain, on: Lane, out: Path) -> list[dict]:
    """The tiny model run, then run again in the same folder with one change at a time: a type
    added, an importance matrix, another outtype (the --json of each)."""
    two, kept = ("Q4_K_M", "Q8_0"), ("--keep-intermediate",)
    calib = calibration_sample(corpus, out.with_name(f"{out.name}-calibration.txt"), 8000)
    runs = [(two, kept), ((*two, "Q6_K"), kept),
            (two, (*kept, "--imatrix", "auto", "--calib", str(calib), "--force", "--no-eval")),
            (two, ("--outtype", "f32", "--force"))]
    results = []
    for quants, extra in runs:
        proc = on.qwrap("run", str(model), "-o", str(out), *qargs(quants), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout))
    return results


def test_changes_rerun_exactly_what_they_affect(background: Lane) -> None:
    first, added, imat, f32 = background.result("changes")  # (on the module's lane)
    assert all(s["state"] == "done" for s in first["steps"])
    done = {s["id"] for s in added["steps"] if s["state"] == "done"}
    assert done == {"gguf.quantize:Q6_K", "gguf.validate:Q6_K"}
    # An imatrix re-quantizes only the types that use one (not Q8_0).
    done = {s["id"] for s in imat["steps"] if s["state"] == "done"}
    assert done == {"gguf.imatrix", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M"}
    # Another outtype re-converts, so everything downstream runs again.
    assert all(s["state"] == "done" for s in f32["steps"])


def test_second_qwrap_on_same_output_is_refused(medium_model: Path, tmp_path: Path, converted: Path) -> None:
    out = tmp_path / "o"
    proc = start(medium_model, out, converted)
    running_child(out, "gguf.quantize:Q4_K_M", proc)  # the first run's quantizations are running
    second = run_qwrap("run", str(medium_model), "-o", str(out), *qargs())
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert second.returncode == 14 and str(proc.pid) in second.stderr


def _memory_cgroup(limit: int) -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        return None
    group = root / f"qwrap-test-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit)) if (group / "memory.memsw.limit_in_bytes").exists() else None
    except OSError:
        return None
    return group


def test_oom_kill_is_reported_with_peak_memory(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    group = _memory_cgroup(160 * 2**20)  # the converter needs ~300 MiB
    if group is None:
        pytest.skip("needs root and a writable cgroup-v1 memory controller to provoke a real OOM kill")
    out = tmp_path / "o"
    try:
        # qwrap joins the group before it starts (a shell joins it, then execs qwrap: no
        # preexec_fn, which is unsafe beside the lane's threads)
        proc = subprocess.run(
            ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"),
             *qwrap_argv("run", str(tiny_model), "-o", str(out), "-q", "Q8_0")], capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=300,
        )
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2)
        group.rmdir()
    assert proc.returncode == 12, proc.stderr
    assert "out of memory" in proc.stderr and "Peak memory" in proc.stderr and "--threads" in proc.stderr
    st = Journal(out).states()["gguf.convert"]
    assert st.state == "failed" and st.error_type == "OutOfMemoryError"


def test_disk_full_then_resume(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)], capture_output=True
    ).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = mnt / "o"
        proc = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q8_0", "-q", "Q4_K_M", "--no-preflight")
        assert proc.returncode == 9, proc.stderr
        assert str(out) in proc.stderr and "needed" in proc.stderr
        # a quantization that ran beside the failing one may have finished: its .partial is a
        # journaled output (done, with its hash), resumed from; nothing else may be left
        assert not unvouched_partials(out)
        no_corrupt = [p for p in out.glob("*.gguf") if p.read_bytes()[:4] != b"GGUF"]
        assert not no_corrupt
        preflight = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q8_0", "-q", "Q4_K_M")
        assert preflight.returncode == 9 and "--no-preflight" in preflight.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        result = finish_tiny(out, tiny_model, quants=("Q8_0", "Q4_K_M"))
        assert all(a["validated"] for a in result["artifacts"])
        assert sha256_file(out / "tiny-llama-Q8_0.gguf") == {a["quant"]: a["sha256"] for a in result["artifacts"]}["Q8_0"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# Named moments of the tiny model's Q4_K_M + Q8_0 run, in the order they happen: qwrap itself
# is SIGKILLed as soon as the moment is journaled (tests/moments.py).
KILL_MOMENTS = (  # (child:gguf.convert: test_sigkill_of_qwrap_leaves_no_orphan_and_resumes)
    "done:gguf.convert",  # the 16-bit GGUF is journaled; the quantizations are starting
    "child:gguf.quantize:Q8_0",  # llama-quantize is writing the .partial
    "done:gguf.quantize:Q4_K_M",  # a .partial vouched for by its record; its validation starting
    "done:gguf.validate:",  # the first validation journaled "done", its rename may not have happened
)


@pytest.mark.parametrize("moment", KILL_MOMENTS)
def test_sigkill_of_qwrap_at_a_named_moment_then_rerun_is_identical(tiny_model: Path, tmp_path: Path,
                                                                    gguf_run: Run, moment: str) -> None:
    """Kill qwrap itself at named moments of its run (SIGKILL: no cleanup at all); the plain
    rerun must finish with exactly the artifacts of an uninterrupted run."""
    quants = ("Q4_K_M", "Q8_0")
    out = tmp_path / "o"
    proc = subprocess.Popen(qwrap_argv("run", str(tiny_model), "-o", str(out), *qargs(quants)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for(out, moment, proc)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}): {err}"
    result = finish_tiny(out, tiny_model, quants=quants)
    assert shas(result) == gguf_run.shas()
    assert not list(out.glob("*.partial"))


def running_children(out: Path, at_least: int, timeout: float = 120) -> list[psutil.Process]:
    """Wait until at least ``at_least`` steps have a live child at once; return those children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / ".checkpoint" / "journal.jsonl").exists():
            states = Journal(out).states()
            alive = []
            for child in Journal(out).children():
                st = states.get(child.step)
                if st is not None and st.state is StepState.STARTED and psutil.pid_exists(child.pid):
                    try:
                        alive.append(psutil.Process(child.pid))
                    except psutil.NoSuchProcess:
                        pass
            if len(alive) >= at_least:
                return alive
        time.sleep(0.02)
    raise AssertionError(f"never saw {at_least} steps running at once")


def test_sigkill_of_qwrap_while_several_children_run(medium_model: Path, tmp_path: Path, converted: Path,
                                                      reference: dict[str, str]) -> None:
    """Each child is started from its step's own thread; all of them die with qwrap."""
    out = tmp_path / "o"
    proc = start(medium_model, out, converted)
    children = running_children(out, 2)
    proc.kill()
    proc.communicate()
    for child in children:
        child.wait(timeout=10)
    assert shas(finish(out, medium_model)) == reference
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("victim", ["child:gguf.quantize:Q5_K_S", "child:gguf.validate:"])
def test_sigkill_of_one_tool_while_others_run_then_resume_is_identical(medium_model: Path, tmp_path: Path,
                                                                      converted: Path, reference: dict[str, str],
                                                                      victim: str) -> None:
    """SIGKILL the tool of a step (a quantization beside another, the first validation) as soon
    as the journal records it: exit 10 saying so and to run again; the steps running beside it
    finish and are kept, nothing new starts; the rerun reuses them and is identical."""
    out = tmp_path / "o"
    proc = start(medium_model, out, converted)
    rec = wait_for(out, victim, proc)
    assert isinstance(rec, dict)
    step = rec["step_ref"]
    try:
        psutil.Process(int(rec["pid"])).kill()
    except psutil.NoSuchProcess:
        raise AssertionError(f"the tool of {step} ended before it was caught") from None
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 10, err
    assert "SIGKILL" in err and "again" in err
    states = Journal(out).states()
    assert states[step].state is StepState.FAILED
    assert not [name for name, st in states.items() if st.state is StepState.STARTED]
    no_partial_finals(out)
    done_before = {name for name, st in states.items() if st.state is StepState.DONE}
    assert "gguf.convert" in done_before
    result = finish(out, medium_model)
    steps = {s["id"]: s["state"] for s in result["steps"]}
    assert all(steps[name] == "skipped" for name in done_before), (done_before, steps)
    assert steps[step] == "done"
    assert shas(result) == reference


HF_SMALL = ("--calib-samples", "4", "--calib-seq-len", "64", "--threads", "1")


def _stop_and_check(proc: subprocess.Popen[str], worker: psutil.Process, signum: int, code: int) -> str:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    worker.wait(timeout=10)  # the worker was stopped with qwrap, not left running
    return err


@dataclass(frozen=True)
class InterruptedTwice:
    first_states: dict[str, StepState]  # the journal's states after the Ctrl-C
    kept: list[Path]  # the layer checkpoints left after it
    second_states: dict[str, StepState]  # after the SIGTERM
    resumed_layers: int  # what the second run's quantization restored
    done: subprocess.CompletedProcess[str]  # the third run


def _gptq_interrupted_twice(model: Path, corpus: Path, on: Lane, out: Path) -> InterruptedTwice:
    argv = qwrap_argv("run", str(model), "-o", str(out), "--format", "gptq", "--calib", str(corpus),
                      "--eval-text", str(corpus), "--eval-tokens", "2048", *HF_SMALL, "--json")
    proc = on.popen(argv)
    worker = running_child(out, "gptq.quantize", proc, timeout=600)
    layers = out / ".checkpoint" / "layers"
    wait_for(out, "file:.checkpoint/layers/**/*.safetensors", proc, timeout=600)  # a layer checkpoint
    _stop_and_check(proc, worker, signal.SIGINT, 130)
    first = {name: st.state for name, st in Journal(out).states().items()}
    kept = sorted(p.relative_to(layers) for p in layers.rglob("*.safetensors"))

    proc = on.popen(argv)
    worker = running_child(out, "gptq.validate", proc, timeout=600)
    # the source model is scored: the artifact's evaluation comes next
    wait_for(out, "file:.checkpoint/work/hf-reference/reference.safetensors", proc, timeout=600)
    _stop_and_check(proc, worker, signal.SIGTERM, 143)
    states = Journal(out).states()
    second = {name: st.state for name, st in states.items()}
    return InterruptedTwice(first, kept, second, states["gptq.quantize"].info["resumed_layers"], on.run(argv))


@pytest.mark.backend
def test_ctrl_c_in_the_gptq_worker_and_sigterm_in_its_evaluation(background: Lane) -> None:
    """Ctrl-C while GPTQ quantizes (after a layer checkpoint) exits 130 and keeps the layers; the
    rerun resumes from them; SIGTERM while the validate step measures the artifact on the
    evaluation chunks exits 143; the third run finishes, reusing the quantization. (Run on the
    background lane: the signals are sent and checked there, _stop_and_check.)"""
    runs: InterruptedTwice = background.result("gptq")
    assert runs.first_states["gptq.quantize"] == "interrupted"
    assert runs.kept, "the layer checkpoints were removed"
    assert runs.second_states["gptq.quantize"] == "done" and runs.second_states["gptq.validate"] == "interrupted"
    assert runs.resumed_layers >= 1  # restored, not recomputed

    done = runs.done
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    steps = {s["id"]: s["state"] for s in result["steps"]}
    assert steps["gptq.quantize"] == "skipped" and steps["gptq.validate"] == "done"
    assert result["artifacts"][0]["validated"] and result["artifacts"][0]["quality"]
