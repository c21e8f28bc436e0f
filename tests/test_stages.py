"""Stages and the emitted jobs as pure functions of a plan (no toolchain needed): arrays per
kind, dependencies, GPU requests, requests from the estimates, determinism."""

from __future__ import annotations

from pathlib import Path

from qwrap import emit_actions, emit_slurm
from qwrap.plan import Estimate, Plan, PlanBuilder
from qwrap.stages import MEM_FLOOR, TaskCommand, stages

GiB = 1 << 30
CMD = TaskCommand(("/opt/qwrap/bin/qwrap",), "/models/m", Path("/shared/out"), ("--quant", "Q4_K_M", "--format", "awq"))


def gguf_and_awq() -> Plan:
    b = PlanBuilder("src", "pin")
    convert = b.add("gguf.convert", "gguf.convert", "gguf", "convert", outputs=("w/m.gguf",),
                    estimate=Estimate(peak_ram_bytes=3 * GiB, seconds=100))
    for q in ("Q4_K_M", "Q8_0"):
        quant = b.add(f"gguf.quantize:{q}", "gguf.quantize", "gguf", q, inputs={"model": convert.id},
                      outputs=(f"m-{q}.gguf.partial",), threaded=True, estimate=Estimate(peak_ram_bytes=GiB, seconds=30))
        b.add(f"gguf.validate:{q}", "gguf.validate", "gguf", q, inputs={"artifact": quant.id, "source": convert.id},
              outputs=(f"m-{q}.gguf",), deliverable=True)
    awq = b.add("awq.quantize", "hf.quantize", "awq", "awq", outputs=("m-AWQ.partial",), gpu=True)
    b.add("awq.validate", "hf.validate", "awq", "awq", inputs={"artifact": awq.id}, outputs=("m-AWQ",),
          deliverable=True, gpu=True)
    return b.plan()


def test_one_stage_per_kind_and_machine_in_dependency_order() -> None:
    st = stages(gguf_and_awq(), cpus=8)
    assert [s.name for s in st] == ["gguf.convert", "gguf.quantize", "gguf.validate", "hf.quantize@gpu",
                                    "hf.validate@gpu"]
    by = {s.name: s for s in st}
    assert by["gguf.quantize"].step_ids == ("gguf.quantize:Q4_K_M", "gguf.quantize:Q8_0")
    assert by["gguf.validate"].after == ("gguf.quantize", "gguf.convert")
    assert by["gguf.quantize"].cpus == 8 and by["gguf.validate"].cpus == 1  # cores for multi-threaded tools
    assert by["gguf.convert"].mem_bytes == int(4.5 * GiB) and by["gguf.quantize"].mem_bytes == int(1.5 * GiB)
    assert by["gguf.convert"].seconds == 600 and by["hf.quantize@gpu"].seconds == 4 * 3600  # floor; no cost model
    assert by["gguf.validate"].mem_bytes == MEM_FLOOR
    assert by["hf.validate@gpu"].gpu and not by["gguf.quantize"].gpu


def test_a_kind_whose_steps_read_one_another_is_cut_by_depth() -> None:
    b = PlanBuilder("src", "pin")
    a = b.add("a", "k", "gguf", "a", outputs=("a",))
    b.add("b", "k", "gguf", "b", inputs={"x": a.id}, outputs=("b",))
    assert [(s.name, s.after) for s in stages(b.plan())] == [("k-0", ()), ("k-1", ("k-0",))]


def test_slurm_scripts_request_what_the_estimates_say_and_chain_the_stages() -> None:
    opts = emit_slurm.SlurmOptions("cpu", "gpu", "lab", Path("/work"), Path("/jobs/logs"))
    files = emit_slurm.render(stages(gguf_and_awq(), cpus=8), CMD, opts)
    assert list(files) == ["1-gguf.convert.sbatch", "2-gguf.quantize.sbatch", "3-gguf.validate.sbatch",
                           "4-hf.quantize-gpu.sbatch", "5-hf.validate-gpu.sbatch", "6-finish.sbatch", "submit.sh"]
    quant = files["2-gguf.quantize.sbatch"]
    for line in ("#SBATCH --array=0-1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=1536M", "#SBATCH --time=00:10:00",
                 "#SBATCH --partition=cpu", "#SBATCH --account=lab", "#SBATCH --chdir=/work",
                 "#SBATCH --output=/jobs/logs/%x-%A_%a.out", "steps=(gguf.quantize:Q4_K_M gguf.quantize:Q8_0)",
                 'exec /opt/qwrap/bin/qwrap run /models/m -o /shared/out --quant Q4_K_M --format awq '
                 '--jobs "${SLURM_CPUS_PER_TASK:-1}" --step "$step"'):
        assert line in quant.splitlines(), line
    gpu = files["4-hf.quantize-gpu.sbatch"]
    assert "#SBATCH --gres=gpu:1" in gpu and "#SBATCH --partition=gpu" in gpu and "--gres" not in quant
    submit = files["submit.sh"].splitlines()
    assert "j3=$(submit --dependency=afterok:$j2:$j1 3-gguf.validate.sbatch)" in submit
    assert "j4=$(submit 4-hf.quantize-gpu.sbatch)" in submit  # reads nothing: starts at once
    assert "j6=$(submit --dependency=afterok:$j1:$j2:$j3:$j4:$j5 6-finish.sbatch)" in submit
    assert "--step" not in files["6-finish.sbatch"]
    assert emit_slurm.render(stages(gguf_and_awq(), cpus=8), CMD, opts) == files  # deterministic


def test_workflow_jobs_mirror_the_stages() -> None:
    text = emit_actions.render(stages(gguf_and_awq()), CMD, "m")
    assert "  s03-gguf-validate:\n" in text and "    needs: [s02-gguf-quantize, s01-gguf-convert]\n" in text
    assert "    runs-on: ${{ inputs.gpu-runner }}\n" in text and 'default: "/shared/out"' in text
    assert 'qwrap run /models/m -o "$QWRAP_STORE" --quant Q4_K_M --format awq --step "$QWRAP_STEP"' in text
    assert "/opt/qwrap" not in text  # the runners' own qwrap
