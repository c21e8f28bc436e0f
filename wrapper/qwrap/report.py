"""The terminal tables of `run` (from the typed result, results.py) and `plan` (from its
document). Only rendering: the result is built once, in results.py."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .quality import columns, noise_text
from .results import BUDGET_COLUMNS, RunResult, budget_rows, labels
from .units import human_bytes


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def render_plan(plan: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{plan['model']}[/bold]: {plan['architecture']}, {plan['parameters']:,} parameters")
    table = Table(title="plan (what `qwrap run` with these options executes)")
    for col in ("step", "reads", "output", "peak RAM", "peak disk", "time"):
        table.add_column(col)
    for s in plan["steps"]:
        e = s["estimates"]
        table.add_row(s["id"], ", ".join(s["inputs"].values()) or "-", human_bytes(e["output_bytes"]),
                      human_bytes(e["peak_ram_bytes"]), human_bytes(e["peak_disk_bytes"]), _seconds(e["seconds"]))
    t = plan["totals"]
    table.add_row("[bold]total[/bold]", "", human_bytes(t["output_bytes"]), human_bytes(t["peak_ram_bytes"]),
                  human_bytes(t["peak_disk_bytes"]), _seconds(t["seconds"]) + " (one after another)")
    console.print(table)
    disk = plan.get("disk") or {}
    if disk:
        console.print(f"peak disk in {disk['path']}: {human_bytes(disk['peak_bytes'])} "
                      f"({human_bytes(disk['free_bytes'])} free)")
    for c in plan["checks"]:
        mark = "[green]ok[/green]  " if c["ok"] else "[red]FAIL[/red]"
        console.print(f"{mark} {c['name']}: {c['detail']}")


def render_table(result: RunResult, console: Console) -> None:
    figures = columns("table")
    table = Table(title=f"qwrap: {result.model.name}")
    for col in ("format", "type", "size", "bits/weight", "validated", *(f.title for f in figures), "time",
                "peak RAM", "path"):
        table.add_column(col)
    for a in result.artifacts:
        cells = [f.text(a.quality) for f in figures]
        if a.gate == "failed":
            cells[0] += " [red]over --max-kld[/red]"
        table.add_row(
            a.format, str(a.quant), human_bytes(a.bytes),
            f"{a.bits_per_weight:.2f}" if a.bits_per_weight else "-",
            "yes" if a.validated else "NO", *cells,
            f"{a.seconds:.1f}s" + (" (reused)" if a.reused else ""),
            human_bytes(a.peak_rss_bytes), a.path,
        )
    p = result.projector
    if p is not None:  # a vision model's projector, beside the text files
        table.add_row(p.format, f"mmproj {p.type}", human_bytes(p.bytes), "-", "yes" if p.validated else "NO",
                      *("-" for _ in figures), "-", "-", p.path)
    console.print(table)
    budgets = budget_rows(result)
    if budgets:
        compared = Table(title="size budgets: the searched file beside the stock type nearest its size, same tokens")
        for col in BUDGET_COLUMNS:
            compared.add_column(col)
        for row in budgets:
            compared.add_row(*row)
        console.print(compared)
        for a in result.artifacts:
            if a.budget is not None:
                console.print(f"{a.quant}: shipped the {a.budget.chosen} file: {a.budget.reason}")
    for c in result.expert_coverages:
        console.print(f"expert coverage, {c.label}: {c.summary}")
    line = noise_line(result)
    if line:
        console.print(line)


def noise_line(result: RunResult) -> str:
    """The artifacts whose mean KLDs the evaluation cannot tell apart, in one line ("" if none)."""
    return noise_text(list(zip(labels(result.artifacts), (a.quality for a in result.artifacts), strict=True)))
