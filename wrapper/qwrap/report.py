"""The run result: one schema-versioned JSON document (``--json``) and a rich table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from .runner import RunOutcome, StepSummary
from .toolchain import read_pin
from .units import human_bytes

RESULT_SCHEMA = "qwrap.result/1"


def _artifact(summary: StepSummary, by_id: dict[str, StepSummary], outcome: RunOutcome) -> dict[str, Any]:
    step = summary.step
    chain = [by_id[i] for i in step.inputs if i in by_id and by_id[i].step.format == step.format]
    producer = chain[0] if chain else summary
    out = (summary.record.get("outputs") or [{}])[0]
    parts = [summary, producer] if producer is not summary else [summary]
    return {
        "format": step.format,
        "quant": step.param("quant") or step.param("label"),
        "path": str(outcome.request.output / out.get("path", step.outputs[0])),
        "bytes": out.get("bytes"),
        "sha256": out.get("sha256"),
        "bits_per_weight": producer.record.get("info", {}).get("bits_per_weight"),
        "validated": bool(summary.record.get("info", {}).get("validated")),
        "quality": summary.record.get("info", {}).get("quality"),
        "seconds": round(sum(p.record.get("seconds", 0.0) for p in parts), 3),
        "peak_rss_bytes": max(p.record.get("peak_rss_bytes", 0) for p in parts),
        "peak_gpu_bytes": max(p.record.get("peak_gpu_bytes", 0) for p in parts),
        "reused": summary.state == "skipped",
        "calibration": producer.record.get("info", {}).get("metadata", {}).get("calibration"),
    }


def build_result(outcome: RunOutcome) -> dict[str, Any]:
    by_id = {s.step.id: s for s in outcome.summaries}
    artifacts = [_artifact(s, by_id, outcome) for s in outcome.summaries if s.step.deliverable]
    src = outcome.source
    return {
        "schema": RESULT_SCHEMA,
        "qwrap_version": __version__,
        "model": {"input": outcome.request.model, "name": src.name, "path": str(src.path),
                  "repo_id": src.repo_id, "revision": src.revision},
        "toolchain": {"llama_cpp_commit": read_pin().commit},
        "request": outcome.request.to_json(),
        "artifacts": artifacts,
        "steps": [
            {"id": s.step.id, "state": s.state, "seconds": s.record.get("seconds"),
             "peak_rss_bytes": s.record.get("peak_rss_bytes")}
            for s in outcome.summaries
        ],
        "warnings": outcome.warnings,
    }


def render_plan(plan: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{plan['model']}[/bold]: {plan['architecture']}, {plan['parameters']:,} parameters")
    table = Table(title="steps")
    for col in ("step", "expected output", "expected peak RAM"):
        table.add_column(col)
    for s in plan["steps"]:
        table.add_row(s["id"], human_bytes(s["expected_bytes"]), human_bytes(s["expected_peak_ram_bytes"]))
    console.print(table)
    disk = plan.get("disk") or {}
    if disk:
        console.print(f"peak disk in {disk['path']}: {human_bytes(disk['peak_bytes'])} "
                      f"({human_bytes(disk['free_bytes'])} free)")
    for c in plan["checks"]:
        mark = "[green]ok[/green]  " if c["ok"] else "[red]FAIL[/red]"
        console.print(f"{mark} {c['name']}: {c['detail']}")


def render_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"qwrap: {result['model']['name']}")
    for col in ("format", "type", "size", "bits/weight", "validated", "time", "peak RAM", "path"):
        table.add_column(col)
    for a in result["artifacts"]:
        table.add_row(
            a["format"], str(a["quant"]), human_bytes(a["bytes"]),
            f"{a['bits_per_weight']:.2f}" if a["bits_per_weight"] else "-",
            "yes" if a["validated"] else "NO",
            f"{a['seconds']:.1f}s" + (" (reused)" if a["reused"] else ""),
            human_bytes(a["peak_rss_bytes"]), a["path"],
        )
    console.print(table)
