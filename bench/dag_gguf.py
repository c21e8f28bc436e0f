#!/usr/bin/env python3
"""Six GGUF types in one qwrap run vs the same commands run by hand, on a ~110M model.

qwrap side: `qwrap run MODEL -o OUT -q Q2_K -q Q3_K_M -q Q4_K_M -q Q5_K_M -q Q6_K -q Q8_0`
into a fresh OUT each run, validation included. Hand side, sequentially: convert_hf_to_gguf.py
to 16-bit, llama-quantize each type with all threads, llama-simple -n 8 each type (the load
check). Runs alternate (qwrap first on odd runs, hand first on even ones).

Reported (bench/results/dag_gguf.json):
  - median qwrap/hand wall ratio; target <= 0.90 (qwrap must beat the naive sequence);
  - per-run wall times and CPU seconds (RUSAGE_CHILDREN deltas: each side with all its tools);
  - the qwrap process' own CPU seconds and peak RSS (its /proc entry, polled);
  - where qwrap's time went: per-step seconds, start/end offsets (steps may overlap) and peak
    RSS from OUT/.checkpoint/journal.jsonl, the hand-run's time for the same step, and qwrap's
    wall time covered by no step (start-up, planning, hashing, the model card).

    .venv/bin/python bench/dag_gguf.py [--runs 3] [--quants Q2_K Q4_K_M ...] [--model DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import (
    RESULTS,
    build_model,
    hand_gguf,
    journal_steps,
    median,
    qwrap_run_argv,
    run_watched,
    stamp,
    steps_union_seconds,
    write_result,
)

QUANTS = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
TARGET = 0.90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quants", nargs="+", default=QUANTS)
    parser.add_argument("--model", type=Path, help="use this model folder instead of building the ~110M one")
    parser.add_argument("--out", type=Path, default=RESULTS / "dag_gguf.json")
    args = parser.parse_args()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qwrap-bench-") as tmp:
        work = Path(tmp)
        model = args.model or build_model(work / "bench-100m", "--params-100m")
        for i in range(args.runs):
            run: dict = {}

            def qwrap(run: dict = run) -> None:
                out = work / "qwrap-out"
                shutil.rmtree(out, ignore_errors=True)
                w = run_watched(qwrap_run_argv(model, out, args.quants))
                steps = journal_steps(out)
                t0 = min((r["started_t"] for r in steps.values() if r.get("started_t")), default=0.0)
                run["qwrap"] = {"wall": w.wall, "cpu": w.cpu, "parent_cpu": w.parent_cpu,
                                "parent_peak_rss_bytes": w.parent_peak_rss,
                                "steps": {k: {"seconds": r.get("seconds"), "peak_rss_bytes": r.get("peak_rss_bytes"),
                                              "start": round((r.get("started_t") or t0) - t0, 3),
                                              "end": round(r.get("t", t0) - t0, 3)}
                                          for k, r in steps.items()},
                                "sum_step_seconds": sum(r.get("seconds") or 0 for r in steps.values()),
                                # wall time not covered by any step: start-up, planning, hashing between steps
                                "outside_steps": w.wall - steps_union_seconds(steps)}

            def hand(run: dict = run) -> None:
                steps = hand_gguf(model, work, args.quants)
                run["hand"] = {"wall": sum(t.wall for t in steps.values()), "cpu": sum(t.cpu for t in steps.values()),
                               "steps": {k: t.wall for k, t in steps.items()}}

            for fn in ((qwrap, hand) if i % 2 == 0 else (hand, qwrap)):
                fn()
            run["ratio"] = run["qwrap"]["wall"] / run["hand"]["wall"]
            runs.append(run)
            print(f"run {i + 1}: qwrap {run['qwrap']['wall']:.2f}s (cpu {run['qwrap']['cpu']:.1f}s, parent "
                  f"{run['qwrap']['parent_cpu']:.2f}s)  hand {run['hand']['wall']:.2f}s (cpu {run['hand']['cpu']:.1f}s)"
                  f"  ratio {run['ratio']:.3f}", flush=True)
    step_ids = list(runs[0]["qwrap"]["steps"])
    where = {s: {"qwrap_seconds": median([r["qwrap"]["steps"][s]["seconds"] or 0 for r in runs]),
                 "hand_seconds": median([r["hand"]["steps"][s] for r in runs if s in r["hand"]["steps"]]),
                 "peak_rss_bytes": max(r["qwrap"]["steps"][s]["peak_rss_bytes"] or 0 for r in runs),
                 "start": median([r["qwrap"]["steps"][s]["start"] for r in runs]),
                 "end": median([r["qwrap"]["steps"][s]["end"] for r in runs])}
             for s in step_ids}
    result = {
        "benchmark": "dag_gguf", "quants": args.quants, "runs": runs,
        "qwrap_seconds": [r["qwrap"]["wall"] for r in runs], "hand_seconds": [r["hand"]["wall"] for r in runs],
        "median_ratio": median([r["ratio"] for r in runs]), "target": TARGET,
        "median_qwrap_cpu": median([r["qwrap"]["cpu"] for r in runs]),
        "median_hand_cpu": median([r["hand"]["cpu"] for r in runs]),
        "median_parent_cpu": median([r["qwrap"]["parent_cpu"] for r in runs]),
        "max_parent_peak_rss_bytes": max(r["qwrap"]["parent_peak_rss_bytes"] for r in runs),
        "median_outside_steps_seconds": median([r["qwrap"]["outside_steps"] for r in runs]),
        "median_sum_step_seconds": median([r["qwrap"]["sum_step_seconds"] for r in runs]),
        "where_qwrap_time_went": where, **stamp(),
    }
    write_result(args.out, result)
    ok = result["median_ratio"] <= TARGET
    print(f"median ratio {result['median_ratio']:.3f} (target <= {TARGET}: {'PASS' if ok else 'FAIL'}) -> {args.out}")
    for s, w in where.items():
        hand = f"{w['hand_seconds']:.2f}s" if w["hand_seconds"] is not None else "-"
        print(f"  {s:24s} qwrap {w['qwrap_seconds']:7.2f}s [{w['start']:6.2f} -> {w['end']:6.2f}]  hand {hand:>8s}"
              f"  peak {w['peak_rss_bytes'] / 2**20:6.0f} MiB")
    print(f"  outside any step: {result['median_outside_steps_seconds']:.2f}s; qwrap process CPU "
          f"{result['median_parent_cpu']:.2f}s, peak RSS {result['max_parent_peak_rss_bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
