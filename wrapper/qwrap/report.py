"""The run result: one schema-versioned JSON document (``--json``) and the terminal tables for
`run` and `plan`. The formats contribute their own fields to each artifact row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

from rich.console import Console
from rich.table import Table

from . import __version__
from .formats import FORMATS, producer_chain
from .model import chat_template
from .plan import StepState
from .quality import Quality, gate, parse_gates
from .request import safe_argv
from .toolchain import read_pin
from .units import human_bytes

if TYPE_CHECKING:
    from typing import NotRequired  # Python 3.11; only a type here

    from .pipeline import RunOutcome
    from .runner import StepSummary

RESULT_SCHEMA = "qwrap.result/2"


class ArtifactRow(TypedDict):
    """One deliverable in the result (``--json`` ``artifacts``); formats fill in their fields."""

    format: str
    quant: str | None
    path: str
    bytes: int | None
    sha256: str | None
    bits_per_weight: float | None
    validated: bool
    quality: Quality | None  # see quality.py; None when not measured (--no-eval)
    gate: str | None  # "passed" / "failed" against --max-kld, None when no limit applies
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    reused: bool
    calibration: dict[str, Any] | None
    shards: NotRequired[list[dict[str, Any]]]  # a split set (--split-max-size): each shard's path, bytes, sha256
    trust_remote_code: bool  # the model's own code ran to make it (AWQ/GPTQ with --trust-remote-code)


class StepRow(TypedDict):
    id: str
    state: str  # a StepState value
    fingerprint: str
    seconds: float | None
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None  # the worker's peak CUDA memory (0 on a CPU)


class RunResult(TypedDict):
    """The ``qwrap run --json`` document, schema qwrap.result/2."""

    schema: str
    qwrap_version: str
    model: dict[str, Any]
    toolchain: dict[str, str]
    request: dict[str, Any]
    command: list[str]
    artifacts: list[ArtifactRow]
    quality_reference: dict[str, Any] | None
    steps: list[StepRow]
    warnings: list[str]


def _artifact(summary: StepSummary, by_id: Mapping[str, StepSummary], outcome: RunOutcome) -> ArtifactRow:
    step = summary.step
    parts = [by_id[s.id] for s in producer_chain(step, outcome.plan) if s.id in by_id]
    record = summary.record
    out: Mapping[str, Any] = record.outputs[0] if record and record.outputs else {}
    inputs = {role: by_id[i].facts for role, i in step.inputs if i in by_id}
    readers = {s.kind: by_id[s.id].facts for s in outcome.plan.consumers(step.id) if s.id in by_id}
    row: ArtifactRow = {
        "format": step.format,
        "quant": step.param("quant"),
        "path": str(outcome.request.output / out.get("path", step.outputs[0])),
        "bytes": out.get("bytes"),
        "sha256": out.get("sha256"),
        "bits_per_weight": None,
        "validated": bool(summary.facts.get("validated")),
        "quality": None,
        "gate": None,
        "seconds": round(sum((p.record.seconds or 0.0) if p.record else 0.0 for p in parts), 3),
        "peak_rss_bytes": max((p.record.peak_rss_bytes if p.record else 0) for p in parts),
        "peak_gpu_bytes": max((p.record.peak_gpu_bytes if p.record else 0) for p in parts),
        "reused": summary.state is StepState.SKIPPED,
        "calibration": None,
        "trust_remote_code": False,
    }
    row.update(FORMATS[step.format].result_fields(summary.facts, inputs, readers))  # type: ignore[typeddict-item]
    row["gate"] = gate(row, parse_gates(outcome.request.max_kld))
    return row


def _quality_reference(outcome: RunOutcome) -> dict[str, Any] | None:
    ev = outcome.model.evaluation
    if ev is None:
        return None
    # the step that provides the evaluation's token ids measured the 16-bit reference
    base = next((s.facts for s in outcome.summaries if any(p.startswith("eval-tokens") for p in s.step.provides)), {})
    return {"text": ev.label, "text_identity": ev.identity, "ctx": ev.ctx, "chunks": base.get("chunks", ev.chunks),
            "tokens_scored": int(base.get("chunks", ev.chunks)) * (ev.ctx - 1 - ev.ctx // 2),
            "ppl_base": base.get("ppl_base"), "bridge": _bridge(outcome, base), "note": ev.note or None}


def _bridge(outcome: RunOutcome, base: Mapping[str, Any]) -> dict[str, Any] | None:
    """How far the two runtimes' references differ on the same tokens: the 16-bit GGUF in
    llama.cpp against the source model in transformers (each row's ppl_base)."""
    llama = base.get("ppl_base")
    views = [v for s in outcome.summaries for v in (s.facts.get("quality"), s.facts.get("weights"))
             if isinstance(v, dict)]
    torch_side = next((v.get("ppl_base") for v in views if v.get("runtime") == "transformers"), None)
    if llama is None or torch_side is None:
        return None
    return {"llama_cpp_16bit_ppl": llama, "transformers_source_ppl": torch_side,
            "relative_difference": (llama - torch_side) / torch_side}


def build_result(outcome: RunOutcome) -> RunResult:
    by_id = {s.step.id: s for s in outcome.summaries}
    # a --step run reports the deliverables that are done; the others are other processes' business
    artifacts = [_artifact(s, by_id, outcome) for s in outcome.summaries
                 if s.step.deliverable and s.record is not None and s.record.state is StepState.DONE]
    src = outcome.source
    return {
        "schema": RESULT_SCHEMA,
        "qwrap_version": __version__,
        "model": {"input": outcome.request.model, "name": src.name, "path": str(src.path),
                  "repo_id": src.repo_id, "revision": src.revision, "chat_template": chat_template(src.path) is not None},
        "toolchain": {"llama_cpp_commit": read_pin().commit},
        "request": outcome.request.to_json(),
        "command": outcome.command or safe_argv(),
        "artifacts": artifacts,
        "quality_reference": _quality_reference(outcome),
        "steps": [
            {"id": s.step.id, "state": s.state.value, "fingerprint": s.step.fingerprint,
             "seconds": s.record.seconds if s.record else None,
             "peak_rss_bytes": s.record.peak_rss_bytes if s.record else None,
             "peak_gpu_bytes": s.record.peak_gpu_bytes if s.record else None}
            for s in outcome.summaries
        ],
        "warnings": outcome.warnings,
    }


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


def _figure(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def render_table(result: RunResult, console: Console) -> None:
    table = Table(title=f"qwrap: {result['model']['name']}")
    for col in ("format", "type", "size", "bits/weight", "validated", "KLD", "KLD p99", "ΔPPL", "top-1", "time",
                "peak RAM", "path"):
        table.add_column(col)
    for a in result["artifacts"]:
        q = a["quality"] or {}
        table.add_row(
            a["format"], str(a["quant"]), human_bytes(a["bytes"]),
            f"{a['bits_per_weight']:.2f}" if a["bits_per_weight"] else "-",
            "yes" if a["validated"] else "NO",
            _figure(q.get("kld_mean"), "{:.4g}") + (" [red]over --max-kld[/red]" if a["gate"] == "failed" else ""),
            _figure(q.get("kld_p99"), "{:.4g}"), _figure(q.get("delta_ppl"), "{:+.4g}"),
            _figure(q.get("top1_agreement"), "{:.1%}"),
            f"{a['seconds']:.1f}s" + (" (reused)" if a["reused"] else ""),
            human_bytes(a["peak_rss_bytes"]), a["path"],
        )
    console.print(table)
