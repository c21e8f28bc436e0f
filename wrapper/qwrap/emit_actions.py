"""`qwrap plan --emit github-actions FILE`: a workflow whose jobs are the plan's stages.

Each stage is a job with a matrix over its steps (``qwrap run ... --step ${{ matrix.step }}``),
``needs:`` the stages it reads, then a last job runs the plain ``qwrap run`` that reuses every
step and writes the model card. The jobs share one output folder, the artifact store, given
as the workflow's ``store`` input (a mount every runner sees: self-hosted runners by default,
a GPU label for GPU stages). Strings are written as JSON scalars, which YAML reads as they are.
"""

from __future__ import annotations

import dataclasses
import json
import re

from .stages import Stage, TaskCommand

STORE = '"$QWRAP_STORE"'


def _job_id(number: int, name: str) -> str:
    return f"s{number:02d}-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _q(text: str) -> str:
    return json.dumps(text)


def _inputs(cmd: TaskCommand) -> list[str]:
    lines = ["on:", "  workflow_dispatch:", "    inputs:"]
    for name, default, about in (
            ("store", str(cmd.output), "The output folder every job shares (a path all runners mount)"),
            ("runner", "self-hosted", "Runner label for CPU steps"),
            ("gpu-runner", "gpu", "Runner label for GPU steps (AWQ/GPTQ)")):
        lines += [f"      {name}:", f"        description: {_q(about)}", "        required: true",
                  f"        default: {_q(default)}", "        type: string"]
    return lines


def _job(job_id: str, title: str, needs: list[str], runner: str, minutes: int, steps: tuple[str, ...] | None,
         command: str) -> list[str]:
    lines = [f"  {job_id}:", f"    name: {_q(title)}", f"    runs-on: ${{{{ inputs.{runner} }}}}",
             f"    timeout-minutes: {minutes}"]
    if needs:
        lines.append(f"    needs: [{', '.join(needs)}]")
    if steps is not None:
        lines += ["    strategy:", "      fail-fast: false", "      matrix:",
                  f"        step: [{', '.join(_q(s) for s in steps)}]"]
    lines += ["    steps:", f"      - name: {_q('qwrap run --step ${{ matrix.step }}' if steps else 'qwrap run')}",
              "        env:", "          HF_TOKEN: ${{ secrets.HF_TOKEN }}", "          QWRAP_STORE: ${{ inputs.store }}"]
    if steps is not None:
        lines.append("          QWRAP_STEP: ${{ matrix.step }}")
    lines += ["        run: |", f"          {command}"]
    return lines


def render(stage_list: list[Stage], cmd: TaskCommand, name: str) -> str:
    cmd = dataclasses.replace(cmd, program=("qwrap",))  # the runners' own install
    ids = {st.name: _job_id(n, st.name) for n, st in enumerate(stage_list, start=1)}
    lines = ["# Written by `qwrap plan --emit github-actions`: one job per stage of the plan, a matrix over its steps.",
             f"name: {_q(f'qwrap {name}')}", *_inputs(cmd), "permissions: {}", "jobs:"]
    for st in stage_list:
        lines += _job(ids[st.name], st.name, [ids[a] for a in st.after], "gpu-runner" if st.gpu else "runner",
                      st.seconds // 60, st.step_ids, cmd.shell(STORE, '--step "$QWRAP_STEP"'))
    lines += _job("finish", "finish", list(ids.values()), "runner", 60, None, cmd.shell(STORE))
    return "\n".join(lines) + "\n"
