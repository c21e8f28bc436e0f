#!/usr/bin/env python3
"""How much of a run the quality evaluation costs, on the ~110M model.

Runs `qwrap run MODEL -q Q4_K_M -q Q8_0 --eval-text CORPUS` (the default evaluation size, which
qwrap sizes to the run on this machine), the same with `--eval-weights on` (the transformers
weights view, off by default on a CPU), and with `--no-eval`, fresh output folders, N times, and
reports the evaluation steps' time (from the journal) as a share of the measured run, and the
wall-time difference. Results: bench/results/eval_share.json.

    .venv/bin/python bench/eval_share.py [--runs 2] [--quants Q4_K_M Q8_0] [--model DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import REPO, RESULTS, build_model, journal_steps, median, qwrap_run_argv, run_timed, stamp, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quants", nargs="+", default=["Q4_K_M", "Q8_0"])
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    corpus = REPO / "tests" / "data" / "corpus.txt"
    with tempfile.TemporaryDirectory(prefix="qwrap-bench-eval-") as tmp:
        work = Path(tmp)
        model = args.model or build_model(work / "m110", "--params-100m")
        rows = []
        for i in range(args.runs):
            plain = work / f"noeval-{i}"
            without = run_timed(qwrap_run_argv(model, plain, args.quants, "--no-eval"))
            shutil.rmtree(plain)
            row: dict = {"no_eval_s": without.wall}
            for label, extra in (("default", ()), ("weights_view", ("--eval-weights", "on"))):
                measured = work / f"{label}-{i}"
                run = run_timed(qwrap_run_argv(model, measured, args.quants, "--eval-text", str(corpus), *extra))
                steps = journal_steps(measured)
                eval_s = sum(r.get("seconds") or 0.0 for s, r in steps.items() if ".eval" in s or ".weights" in s)
                chunks = next((r.get("info", {}).get("chunks") for s, r in steps.items()
                               if s.endswith("eval-base")), None)
                row[label] = {"run_s": run.wall, "eval_steps_s": eval_s, "share": eval_s / run.wall, "chunks": chunks,
                              "extra_wall_s": run.wall - without.wall}
                print(f"run {i + 1} {label}: {run.wall:.1f}s against {without.wall:.1f}s without evaluation; "
                      f"eval steps {eval_s:.1f}s = {100 * eval_s / run.wall:.0f}% of the run ({chunks} chunks)")
                shutil.rmtree(measured)
            rows.append(row)
    result = {"benchmark": "eval_share", "quants": args.quants, "runs": rows,
              "median_share": median([r["default"]["share"] for r in rows]),
              "median_share_weights_view": median([r["weights_view"]["share"] for r in rows]),
              "median_extra_wall_s": median([r["default"]["extra_wall_s"] for r in rows]), **stamp()}
    print(f"median evaluation share {100 * (result['median_share'] or 0):.0f}% "
          f"({100 * (result['median_share_weights_view'] or 0):.0f}% with the weights view) -> {RESULTS / 'eval_share.json'}")
    write_result(RESULTS / "eval_share.json", result)


if __name__ == "__main__":
    main()
