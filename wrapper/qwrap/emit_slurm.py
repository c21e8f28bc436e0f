"""`qwrap plan --emit slurm DIR`: one sbatch script per stage, and ``submit.sh``.

A stage of several steps is one job array, a task per step; every task runs
``qwrap run ... --step <its id>`` on the shared output folder. ``submit.sh`` submits the
stages in order, each with ``--dependency=afterok:<the job ids of the stages it reads>``
(``--kill-on-invalid-dep=yes``, so a failed stage cancels what waits for it instead of leaving
it pending), then a last job: a plain ``qwrap run`` that reuses every step and writes the
model card and quality page. Resubmitting after a failure reruns only what is not done.
The files are a function of the plan and the options alone (no dates, no user names).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .stages import Stage, TaskCommand

FINISH = "finish"
FINISH_MEM = 2 << 30
FINISH_SECONDS = 3600


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    gpu_partition: str | None = None
    account: str | None = None
    chdir: Path = Path("/")  # where the jobs run: relative paths in the options mean the same there
    logs: Path = Path("logs")  # absolute: Slurm reads a relative --output from the job's --chdir


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _header(name: str, stage: Stage | None, opts: SlurmOptions) -> list[str]:
    cpus, mem, seconds, gpu = (stage.cpus, stage.mem_bytes, stage.seconds, stage.gpu) if stage else (
        1, FINISH_MEM, FINISH_SECONDS, False)
    lines = [f"#SBATCH --job-name=qwrap-{name}", f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --mem={mem >> 20}M", f"#SBATCH --time={_hms(seconds)}"]
    if stage is not None and len(stage.steps) > 1:
        lines.append(f"#SBATCH --array=0-{len(stage.steps) - 1}")
    partition = opts.gpu_partition if gpu and opts.gpu_partition else opts.partition
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gpu:
        lines.append("#SBATCH --gres=gpu:1")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    pattern = "%x-%A_%a.out" if stage and len(stage.steps) > 1 else "%x-%j.out"
    lines += [f"#SBATCH --chdir={opts.chdir}", f"#SBATCH --output={opts.logs / pattern}"]
    return lines


def stage_script(number: int, total: int, stage: Stage, cmd: TaskCommand, opts: SlurmOptions) -> str:
    ids = stage.step_ids
    what = f"{len(ids)} steps, one array task each" if len(ids) > 1 else "1 step"
    body = ["#!/bin/bash", f"# qwrap stage {number} of {total}: {stage.name} ({what}), "
            f"after: {', '.join(stage.after) or 'nothing'}. Written by `qwrap plan --emit slurm`.",
            *_header(stage.name, stage, opts), "set -euo pipefail"]
    if len(ids) > 1:
        body += [f"steps=({' '.join(shlex.quote(i) for i in ids)})", 'step="${steps[$SLURM_ARRAY_TASK_ID]}"']
    else:
        body.append(f"step={shlex.quote(ids[0])}")
    body.append("exec " + cmd.shell(None, '--jobs "${SLURM_CPUS_PER_TASK:-1}"', '--step "$step"'))
    return "\n".join(body) + "\n"


def finish_script(total: int, cmd: TaskCommand, opts: SlurmOptions) -> str:
    return "\n".join([
        "#!/bin/bash",
        f"# qwrap stage {total} of {total}: every step is done; a plain run reuses them all and writes the "
        "model card and quality page. Written by `qwrap plan --emit slurm`.",
        *_header(FINISH, None, opts), "set -euo pipefail",
        "exec " + cmd.shell(None, '--jobs "${SLURM_CPUS_PER_TASK:-1}"'),
    ]) + "\n"


def submit_script(files: list[tuple[str, tuple[int, ...]]]) -> str:
    """``files``: (script name, the numbers of the scripts it waits for), in order."""
    lines = ["#!/bin/sh", "# Submits every stage in order, each after the stages it reads; prints each script's job id.",
             "# Resubmit after a failure: steps already done are reused, only the rest runs again.",
             "set -eu", 'cd "$(dirname "$0")"', "mkdir -p logs",
             'submit() { id=$(sbatch --parsable --kill-on-invalid-dep=yes "$@"); echo "${id%%;*}"; }']
    for n, (name, after) in enumerate(files, start=1):
        dep = f"--dependency=afterok:{':'.join(f'$j{a}' for a in after)} " if after else ""
        lines += [f"j{n}=$(submit {dep}{name})", f'echo "{name} $j{n}"']
    return "\n".join(lines) + "\n"


def render(stage_list: list[Stage], cmd: TaskCommand, opts: SlurmOptions) -> dict[str, str]:
    """File name -> content, for every script and submit.sh."""
    total = len(stage_list) + 1
    width = len(str(total))
    names = {st.name: f"{n:0{width}d}-{st.name.replace('@', '-')}.sbatch" for n, st in enumerate(stage_list, start=1)}
    number = {st.name: n for n, st in enumerate(stage_list, start=1)}
    files = {names[st.name]: stage_script(number[st.name], total, st, cmd, opts) for st in stage_list}
    finish = f"{total:0{width}d}-{FINISH}.sbatch"
    files[finish] = finish_script(total, cmd, opts)
    order = [(names[st.name], tuple(number[a] for a in st.after)) for st in stage_list]
    order.append((finish, tuple(range(1, total))))
    files["submit.sh"] = submit_script(order)
    return files
