"""Issue 10 without a scheduler: `run --step` from concurrent processes on one folder, the same
step twice, steps run too early, `status` of a shared folder, and the emitted Slurm scripts and
GitHub Actions workflow (linted by the real actionlint)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from background import Lane, lane, selected, share
from conftest import artifact_shas, qwrap_argv, run_qwrap, scaleout_options, scaleout_reference_run
from moments import wait_for
from qwrap.journal import Journal
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow


def options(corpus: Path) -> list[str]:
    return scaleout_options(corpus)


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lane]:
    """The session's scaleout_reference run, started on a second lane (background.py) when the
    module's first test starts: that test's --step processes go on beside it."""
    root = tmp_path_factory.mktemp("background")
    with lane(root) as on:
        if "test_concurrent_step_processes_make_what_one_run_makes" in selected(request):
            model, corpus = request.getfixturevalue("tiny_model"), request.getfixturevalue("corpus")
            request.getfixturevalue("toolchain")
            share(on, "scaleout_reference", scaleout_reference_run, on.qwrap, model, corpus, root / "reference")
        yield on


def plan_steps(model: Path, out: Path, opts: list[str]) -> list[dict]:
    proc = run_qwrap("plan", str(model), "-o", str(out), *opts, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["steps"]


def waves(steps: list[dict]) -> list[list[str]]:
    """The steps by depth: every step of a wave reads only steps of earlier waves."""
    depth: dict[str, int] = {}
    for s in steps:
        depth[s["id"]] = 1 + max((depth[i] for i in s["inputs"].values()), default=-1)
    return [[i for i, d in depth.items() if d == n] for n in range(max(depth.values()) + 1)]


def step_process(model: Path, out: Path, opts: list[str], *step_ids: str) -> subprocess.Popen[str]:
    steps = [w for i in step_ids for w in ("--step", i)]
    return subprocess.Popen(qwrap_argv("run", str(model), "-o", str(out), *opts, "--jobs", "1", *steps),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_concurrent_step_processes_make_what_one_run_makes(tiny_model: Path, corpus: Path, tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    out, opts = tmp_path / "o", options(corpus)
    steps = plan_steps(tiny_model, out, opts)
    started = time.monotonic()
    for wave in waves(steps):  # one process per step, all of a wave at once
        procs = {i: step_process(tiny_model, out, opts, i) for i in wave}
        for i, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{i}: {err}"
    print(f"{len(steps)} --step processes in {time.monotonic() - started:.1f} s")
    lines = Journal(out).path.read_bytes().split(b"\n")
    assert all(json.loads(line) for line in lines if line)  # no interleaved or torn line
    states = Journal(out).states()
    assert {s["id"] for s in steps} == {i for i, st in states.items() if st.state == "done"}
    again = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--json")
    assert again.returncode == 0, again.stderr
    assert {s["state"] for s in json.loads(again.stdout)["steps"]} == {"skipped"}  # reuses everything
    # what one uninterrupted run makes (asked for only now: it runs beside this test, `background`)
    assert artifact_shas(out) == request.getfixturevalue("scaleout_reference")
    status = json.loads(run_qwrap("status", str(out), "--json").stdout)
    rows = {s["step"]: s for s in status["steps"]}
    assert set(rows) == {s["id"] for s in steps} and {r["state"] for r in rows.values()} == {"done"}
    assert all(r["host"] and r["by"].startswith("pid ") for r in rows.values())


def test_a_step_run_too_early_names_what_to_run(tiny_model: Path, corpus: Path, tmp_path: Path,
                                                toolchain: Toolchain) -> None:
    out, opts = tmp_path / "o", options(corpus)
    early = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.validate:Q8_0")
    assert early.returncode == 22, early.stderr
    assert "gguf.quantize:Q8_0" in early.stderr and "--step gguf.convert" in early.stderr.replace("\n", " ")
    assert "Traceback" not in early.stderr
    unknown = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.quantize:Q2_K")
    assert unknown.returncode == 2 and "gguf.quantize:Q8_0" in unknown.stderr
    # a step and the step that reads it, named together, run in order
    both = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.quantize:Q8_0",
                     "--step", "gguf.convert", "--json")
    assert both.returncode == 0, both.stderr
    states = {s["id"]: s["state"] for s in json.loads(both.stdout)["steps"]}
    assert states["gguf.convert"] == states["gguf.quantize:Q8_0"] == "done"
    assert states["gguf.quantize:Q4_K_M"] == "pending"
    repeat = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.convert", "--json")
    assert json.loads(repeat.stdout)["steps"][0]["state"] == "skipped"  # done and verified: reused
    validate = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.validate:Q8_0")
    assert validate.returncode == 0, validate.stderr
    # its validation renamed the quantization's partial file: asked again, that step has nothing left to give
    again = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.quantize:Q8_0", "--json")
    assert {s["id"]: s["state"] for s in json.loads(again.stdout)["steps"]}["gguf.quantize:Q8_0"] == "skipped"
    assert not list(out.glob("*.partial"))


def test_the_same_step_twice_at_once_the_second_exits_14(tiny_model: Path, corpus: Path, tmp_path: Path,
                                                          toolchain: Toolchain) -> None:
    out, opts = tmp_path / "o", options(corpus)
    first = step_process(tiny_model, out, opts, "gguf.convert")
    wait_for(out, "child:gguf.convert", first, timeout=120)  # the first one's converter is running
    second = run_qwrap("run", str(tiny_model), "-o", str(out), *opts, "--step", "gguf.convert")
    whole = run_qwrap("run", str(tiny_model), "-o", str(out), *opts)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 14, second.stderr
    assert "gguf.convert is already running" in second.stderr and f"pid {first.pid}" in second.stderr
    assert whole.returncode == 14 and "--step" in whole.stderr  # a whole-plan run waits for none of them
    history = [r["state"] for r in Journal(out).history("gguf.convert")]
    assert history == ["started", "done"]  # the second one wrote nothing


def test_emitted_slurm_scripts_call_every_step_in_dependency_order(tiny_model: Path, corpus: Path, tmp_path: Path,
                                                                    toolchain: Toolchain) -> None:
    out, opts = tmp_path / "o", options(corpus)
    steps = plan_steps(tiny_model, out, opts)
    emitted = []
    jobs = tmp_path / "jobs"
    for _ in range(2):
        proc = run_qwrap("plan", str(tiny_model), "-o", str(out), *opts, "--emit", "slurm", str(jobs),
                         "--partition", "cpu", "--gpu-partition", "gpu", "--account", "lab")
        assert proc.returncode == 0, proc.stderr
        emitted.append({p.name: p.read_text() for p in sorted(jobs.iterdir()) if p.is_file()})
    assert emitted[0] == emitted[1]  # deterministic
    assert not out.exists()  # plan writes nothing in the output folder
    scripts = emitted[0]
    submit = scripts.pop("submit.sh")
    named = set()
    for text in scripts.values():
        assert "#SBATCH --partition=cpu" in text and "#SBATCH --account=lab" in text
        assert "#SBATCH --mem=" in text and "#SBATCH --time=" in text and "#SBATCH --cpus-per-task=" in text
        ids = steps_of(text)
        if len(ids) > 1:
            assert f"#SBATCH --array=0-{len(ids) - 1}" in text
        assert '--step "$step"' in text if ids else "--step" not in text  # no step: the finishing plain run
        # what this host chose for the defaults is pinned: a GPU node and a CPU node plan alike
        assert "--eval-weights off" in text or "--eval-weights on" in text
        named |= set(ids)
    assert named == {s["id"] for s in steps}
    # each stage is submitted after the stages it reads
    order = [line.split("$(submit ")[1] for line in submit.splitlines() if "$(submit " in line]
    position = {o.split()[-1].rstrip(")"): n for n, o in enumerate(order, start=1)}
    stage_of = {i: name for name, text in scripts.items() for i in steps_of(text)}
    for s in steps:
        for i in s["inputs"].values():
            line = next(o for o in order if o.rstrip(")").endswith(stage_of[s["id"]]))
            assert f"$j{position[stage_of[i]]}" in line, (s["id"], i)


def steps_of(script: str) -> list[str]:
    if "steps=(" in script:
        return script.split("steps=(")[1].split(")")[0].split()
    if "\nstep=" in script:
        return [script.split("\nstep=")[1].split("\n")[0]]
    return []


def test_emitted_github_workflow_passes_actionlint(tiny_model: Path, corpus: Path, tmp_path: Path,
                                                   toolchain: Toolchain) -> None:
    actionlint = shutil.which("actionlint") or str(Path(__import__("sys").executable).parent / "actionlint")
    if not Path(actionlint).exists():
        pytest.fail("actionlint is not installed (the test extras of pyproject.toml: `make venv`)", pytrace=False)
    out, workflow = tmp_path / "o", tmp_path / "wf" / "quantize.yml"
    proc = run_qwrap("plan", str(tiny_model), "-o", str(out), *options(corpus), "--emit", "github-actions",
                     str(workflow))
    assert proc.returncode == 0, proc.stderr
    lint = subprocess.run([actionlint, "-no-color", str(workflow)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = workflow.read_text()
    assert "needs: [s01-gguf-convert]" in text and '"gguf.quantize:Q4_K_M", "gguf.quantize:Q8_0"' in text
    assert '--step "$QWRAP_STEP"' in text and '-o "$QWRAP_STORE"' in text and "inputs.store" in text
    bad = run_qwrap("plan", str(tiny_model), "-o", str(out), "--emit", "kubernetes", str(tmp_path / "k"))
    assert bad.returncode == 2 and "slurm, github-actions" in bad.stderr
