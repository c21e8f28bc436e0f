"""`qwrap status OUT`: the journal as a table (or JSON): one row per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import UsageError
from .journal import Journal
from .units import human_bytes


def collect(output: Path) -> dict[str, Any]:
    journal = Journal(output)
    if not journal.path.exists():
        raise UsageError(f"{output} has no qwrap journal", hint="Pass the --output folder of a run.")
    header = journal.run_header() or {}
    steps = []
    for st in journal.states().values():
        steps.append({
            "step": st.step,
            "state": st.state.value,
            "seconds": st.seconds,
            "peak_rss_bytes": st.peak_rss_bytes,
            "peak_gpu_bytes": st.peak_gpu_bytes,
            "outputs": [o["path"] for o in st.outputs],
            "error": st.error,
            "log": st.log,
            "time": st.t,
        })
    return {"schema": "qwrap.status/1", "output": str(output), "model": header.get("request", {}).get("model"),
            "steps": steps, "warnings": journal.warnings}


def render(info: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{info['output']} ({info['model']})")
    for col in ("step", "state", "time", "peak RAM", "output / error"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "interrupted": "yellow", "started": "yellow"}
    for s in info["steps"]:
        color = colors.get(s["state"], "white")
        detail = s["error"] or ", ".join(s["outputs"])
        table.add_row(s["step"], f"[{color}]{s['state']}[/{color}]",
                      f"{s['seconds']:.1f}s" if s["seconds"] is not None else "-",
                      human_bytes(s["peak_rss_bytes"]) if s["peak_rss_bytes"] else "-", detail)
    console.print(table)
