"""`qwrap status OUT`: the journal as a table (or JSON): one row per step of the plan, whichever
process or machine ran it. A ``started`` step whose lock is held is ``running``; one whose lock
is free was left by a process that died (the next run closes it and runs it again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import UsageError
from .journal import Journal, checkpoint_dir
from .locks import step_running
from .results import RESULT_FILE, load
from .units import human_bytes


def collect(output: Path) -> dict[str, Any]:
    journal = Journal(output)
    if not journal.path.exists():
        raise UsageError(f"{output} has no qwrap journal", hint="Pass the --output folder of a run.")
    header = journal.run_header() or {}
    states = journal.states()
    steps = []
    for step_id in dict.fromkeys([*header.get("plan", []), *states]):
        st = states.get(step_id)
        if st is None:
            steps.append({"step": step_id, "state": "pending", "host": None, "by": None, "seconds": None,
                          "peak_rss_bytes": 0, "peak_gpu_bytes": 0, "outputs": [], "error": None, "log": None,
                          "time": None})
            continue
        state = st.state.value
        if state == "started":
            state = "running" if step_running(output, step_id) else "started (its process is gone)"
        steps.append({
            "step": st.step,
            "state": state,
            "host": st.host,
            "by": st.by,
            "seconds": st.seconds,
            "peak_rss_bytes": st.peak_rss_bytes,
            "peak_gpu_bytes": st.peak_gpu_bytes,
            "outputs": [o["path"] for o in st.outputs],
            "error": st.error,
            "log": st.log,
            "time": st.t,
        })
    warnings = list(journal.warnings)
    return {"schema": "qwrap.status/2", "output": str(output), "model": header.get("request", {}).get("model"),
            "steps": steps, "result": _finished(output, warnings), "warnings": warnings}


def _finished(output: Path, warnings: list[str]) -> dict[str, Any] | None:
    """The last finished run's artifacts (result.json, read through results.load), or None."""
    if not (checkpoint_dir(output) / RESULT_FILE).exists():
        return None
    try:
        result = load(output)
    except UsageError as exc:
        warnings.append(exc.message)
        return None
    return {"complete": result.complete,
            "artifacts": [{"format": a.format, "quant": a.quant, "path": a.path, "validated": a.validated,
                           "kld_mean": a.kld_mean, "gate": a.gate} for a in result.artifacts]}


def render(info: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{info['output']} ({info['model']})")
    for col in ("step", "state", "host", "run by", "time", "peak RAM", "output / error"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "pending": "dim"}
    for s in info["steps"]:
        color = colors.get(s["state"], "yellow")
        detail = s["error"] or ", ".join(s["outputs"])
        table.add_row(s["step"], f"[{color}]{s['state']}[/{color}]", s["host"] or "-", s["by"] or "-",
                      f"{s['seconds']:.1f}s" if s["seconds"] is not None else "-",
                      human_bytes(s["peak_rss_bytes"]) if s["peak_rss_bytes"] else "-", detail)
    console.print(table)
    finished = info.get("result")
    if finished:
        for a in finished["artifacts"]:
            kld = "-" if a["kld_mean"] is None else f"{a['kld_mean']:.4g}"
            gate = f", gate {a['gate']}" if a["gate"] else ""
            console.print(f"finished: {a['format']} {a['quant']}: {a['path']} (validated: "
                          f"{'yes' if a['validated'] else 'NO'}, KLD {kld}{gate})", highlight=False)
    for warning in info["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
