#!/usr/bin/env python3
"""The GGUF path (one type, Q4_K_M) on offline random llama models of ~7M, ~110M, ~400M and
~1B parameters: qwrap's overhead, its own memory, and how good `qwrap plan`'s estimates are.

Per size (bench/results/scaling.json):
  - qwrap/hand-run wall ratio (median of --runs alternating pairs; hand run = convert to
    16-bit, llama-quantize, llama-simple, sequentially);
  - the qwrap process' own peak RSS (VmHWM of that one pid, polled): target <= 100 MB
    (100,000,000 bytes) at every size;
  - the converter's peak RSS (the journal's gguf.convert "peak_rss_bytes");
  - per step, measured vs `qwrap plan MODEL -o OUT -q Q4_K_M --json` estimates, PASS when
    the estimate is within 10% of the measurement (or within 1 MiB / 0.5 s, for tiny values):
      output_bytes   <- sum of the journal record's "outputs"[].bytes
      peak_ram_bytes <- the journal record's "peak_rss_bytes" (the tool's process tree)
      peak_disk_bytes<- what the step added to OUT at its peak: the max size of everything
                        under OUT (.checkpoint/work included), sampled every 0.05 s between
                        the step's started and done records, minus OUT's first sample after its start
                        (the absolute peak is reported too, as peak_disk_abs_bytes)
      seconds        <- the journal record's "seconds"
    and for the whole run, plan "totals" vs measured: peak_disk_bytes (OUT's largest size),
    peak_ram_bytes (the largest step peak), seconds (qwrap's wall time).
    Note: a validate step renames its quantize step's file; the journal lists that file as
    its output while the plan counts the step's new bytes (0), so its output_bytes differ
    by definition.
    The plan's per-step "estimates" object is used when present (qwrap.plan/2), else the
    older "expected_bytes"/"expected_peak_ram_bytes" keys. Measurements are the max (RAM,
    disk) or median (seconds, bytes) over the runs.

The 1B model takes a while on 2 cores (about 2 GB of bf16 weights, several minutes a pair).

    .venv/bin/python bench/scaling.py [--sizes 7m 110m 400m 1b] [--runs 2] [--quant Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    QWRAP,
    RESULTS,
    build_model,
    disk_at,
    disk_peak_between,
    hand_gguf,
    journal_steps,
    median,
    qwrap_run_argv,
    run_watched,
    stamp,
    write_result,
)

# make-tiny-model flags; every weight row stays a multiple of 256 so K-quants apply everywhere.
SIZES = {
    "7m": ["--hidden", "256", "--layers", "6", "--heads", "4", "--kv-heads", "2", "--ffn", "768", "--vocab", "4096"],
    "110m": ["--params-100m"],
    "400m": ["--hidden", "1024", "--layers", "24", "--heads", "16", "--kv-heads", "4", "--ffn", "3584",
             "--vocab", "32768"],
    "1b": ["--hidden", "2048", "--layers", "20", "--heads", "16", "--kv-heads", "4", "--ffn", "5632",
           "--vocab", "32768"],
}
PARENT_RSS_TARGET = 100_000_000
TOLERANCE = 0.10
SLACK = {"bytes": 1 << 20, "seconds": 0.5}  # so that near-zero values (logs, a rename) can pass
METRICS = ("output_bytes", "peak_ram_bytes", "peak_disk_bytes", "seconds")


def plan_estimates(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for step in plan.get("steps", []):
        est = step.get("estimates") or {}
        out[step.get("id")] = {
            "output_bytes": est.get("output_bytes", step.get("expected_bytes")),
            "peak_ram_bytes": est.get("peak_ram_bytes", step.get("expected_peak_ram_bytes")),
            "peak_disk_bytes": est.get("peak_disk_bytes"),
            "seconds": est.get("seconds"),
        }
    return out


def compare(metric: str, measured: float | None, estimate: float | None) -> dict[str, Any]:
    if measured is None or estimate is None:
        return {"measured": measured, "estimate": estimate, "pass": None}
    slack = max(TOLERANCE * measured, SLACK["seconds" if metric == "seconds" else "bytes"])
    ok = abs(estimate - measured) <= slack
    return {"measured": measured, "estimate": estimate,
            "ratio": estimate / measured if measured else None, "pass": ok}


def one_size(name: str, work: Path, runs: int, quant: str) -> dict[str, Any]:
    model = work / f"model-{name}"
    out = work / "qwrap-out"
    build = run_timed_build(model, SIZES[name])
    proc = subprocess.run([str(QWRAP), "plan", str(model), "-o", str(out), "-q", quant, "--json"],
                          capture_output=True, text=True)
    plan = json.loads(proc.stdout) if proc.stdout.strip() else {}
    qwrap_runs, hand_runs = [], []
    for i in range(runs):
        def qwrap() -> None:
            shutil.rmtree(out, ignore_errors=True)
            w = run_watched(qwrap_run_argv(model, out, [quant]), watch_dir=out, disk_interval=0.05)
            steps = journal_steps(out)
            for s in steps.values():
                s["disk_peak"] = disk_peak_between(w.disk, s.get("started_t"), s.get("t"))
                s["disk_start"] = disk_at(w.disk, s.get("started_t"))
                s["output_total"] = sum(o.get("bytes", 0) for o in s.get("outputs", []))
            qwrap_runs.append({"wall": w.wall, "cpu": w.cpu, "parent_cpu": w.parent_cpu,
                               "parent_peak_rss_bytes": w.parent_peak_rss,
                               "disk_peak_bytes": max((b for _, b in w.disk), default=0),
                               "steps": {k: {"seconds": s.get("seconds"), "peak_rss_bytes": s.get("peak_rss_bytes"),
                                             "output_bytes": s["output_total"],
                                             "peak_disk_abs_bytes": s["disk_peak"],
                                             "peak_disk_bytes": None if s["disk_peak"] is None
                                             else s["disk_peak"] - s["disk_start"]}
                                         for k, s in steps.items()}})

        def hand() -> None:
            steps = hand_gguf(model, work, [quant])
            hand_runs.append({"wall": sum(t.wall for t in steps.values()), "cpu": sum(t.cpu for t in steps.values())})

        for fn in ((qwrap, hand) if i % 2 == 0 else (hand, qwrap)):
            fn()
        print(f"  {name} run {i + 1}: qwrap {qwrap_runs[-1]['wall']:.1f}s  hand {hand_runs[-1]['wall']:.1f}s  "
              f"parent peak {qwrap_runs[-1]['parent_peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    estimates = plan_estimates(plan)
    steps = {}
    for sid in qwrap_runs[0]["steps"]:
        per_run = [r["steps"][sid] for r in qwrap_runs]
        measured = {
            "output_bytes": median([s["output_bytes"] for s in per_run]),
            "peak_ram_bytes": max((s["peak_rss_bytes"] or 0 for s in per_run), default=None),
            "peak_disk_bytes": max((s["peak_disk_bytes"] for s in per_run if s["peak_disk_bytes"] is not None),
                                   default=None),
            "seconds": median([s["seconds"] or 0 for s in per_run]),
        }
        est = estimates.get(sid, {})
        steps[sid] = {m: compare(m, measured[m], est.get(m)) for m in METRICS}
        steps[sid]["peak_disk_abs_bytes"] = max((s["peak_disk_abs_bytes"] or 0 for s in per_run), default=None)
    totals = plan.get("totals") or {}
    measured_totals = {
        "peak_disk_bytes": max(r["disk_peak_bytes"] for r in qwrap_runs),
        "peak_ram_bytes": max(max((s["peak_rss_bytes"] or 0 for s in r["steps"].values()), default=0)
                              for r in qwrap_runs),
        "seconds": median([r["wall"] for r in qwrap_runs]),
    }
    parent_peak = max(r["parent_peak_rss_bytes"] for r in qwrap_runs)
    convert = qwrap_runs[-1]["steps"].get("gguf.convert", {})
    return {
        "make_tiny_model_args": SIZES[name], "build_seconds": build,
        "parameters": plan.get("parameters"), "plan_schema": plan.get("schema"), "plan_totals": plan.get("totals"),
        "qwrap_runs": qwrap_runs, "hand_runs": hand_runs,
        "median_ratio": median([q["wall"] / h["wall"] for q, h in zip(qwrap_runs, hand_runs, strict=False)]),
        "parent_peak_rss_bytes": parent_peak, "parent_rss_pass": parent_peak <= PARENT_RSS_TARGET,
        "converter_peak_rss_bytes": convert.get("peak_rss_bytes"),
        "disk_peak_bytes": max(r["disk_peak_bytes"] for r in qwrap_runs),
        "steps_vs_plan": steps,
        "totals_vs_plan": {m: compare(m, v, totals.get(m)) for m, v in measured_totals.items()},
    }


def verdict(metric: str, c: dict[str, Any]) -> str:
    word = {True: "ok", False: "OFF", None: "n/a"}[c["pass"]]
    return f"{metric}={word}" + (f"({c['ratio']:.2f})" if c.get("ratio") is not None else "")


def run_timed_build(model: Path, flags: list[str]) -> float:
    t = time.perf_counter()
    build_model(model, *flags)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "scaling", "quant": args.quant, "runs": args.runs,
                              "parent_rss_target_bytes": PARENT_RSS_TARGET, "tolerance": TOLERANCE, "sizes": {}}
    for name in args.sizes:
        print(f"size {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"qwrap-bench-{name}-") as tmp:
            result["sizes"][name] = r = one_size(name, Path(tmp), args.runs, args.quant)
        write_result(args.out, {**result, **stamp()})  # keep what is done if a later size fails
        print(f"  ratio {r['median_ratio']:.3f}  parent peak {r['parent_peak_rss_bytes'] / 1e6:.1f} MB "
              f"({'PASS' if r['parent_rss_pass'] else 'FAIL'} <= 100 MB)  converter peak "
              f"{(r['converter_peak_rss_bytes'] or 0) / 1e6:.0f} MB")
        for sid, metrics in [*r["steps_vs_plan"].items(), ("totals", r["totals_vs_plan"])]:
            print(f"    {sid:22s} " + " ".join(verdict(m, metrics[m]) for m in METRICS if m in metrics))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
