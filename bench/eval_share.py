#!/usr/bin/env python3
"""How much of a run the quality evaluation costs, on the ~110M model.

Runs `qwrap run MODEL -q Q4_K_M -q Q8_0 --eval-text CORPUS` (the default number of evaluation
tokens for the model's size) and the same with `--no-eval`, fresh output folders, N times, and
reports the evaluation steps' time (from the journal) as a share of the measured run, and the
wall-time difference between the two. Results: bench/results/eval_share.json.

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
            measured, plain = work / f"eval-{i}", work / f"noeval-{i}"
            with_eval = run_timed(qwrap_run_argv(model, measured, args.quants, "--eval-text", str(corpus)))
            without = run_timed(qwrap_run_argv(model, plain, args.quants, "--no-eval"))
            steps = journal_steps(measured)
            eval_s = sum(r.get("seconds") or 0.0 for s, r in steps.items() if ".eval" in s)
            tokens = next((r.get("info", {}).get("chunks") for s, r in steps.items() if s.endswith("eval-base")), None)
            rows.append({"run_s": with_eval.wall, "no_eval_s": without.wall, "eval_steps_s": eval_s,
                         "share": eval_s / with_eval.wall, "chunks": tokens})
            print(f"run {i + 1}: with eval {with_eval.wall:.1f}s, without {without.wall:.1f}s, "
                  f"eval steps {eval_s:.1f}s = {100 * eval_s / with_eval.wall:.0f}% of the run ({tokens} chunks)")
            shutil.rmtree(measured)
            shutil.rmtree(plain)
    result = {"benchmark": "eval_share", "quants": args.quants, "runs": rows,
              "median_share": median([r["share"] for r in rows]),
              "median_extra_wall_s": median([r["run_s"] - r["no_eval_s"] for r in rows]), **stamp()}
    print(f"median evaluation share {100 * (result['median_share'] or 0):.0f}% -> {RESULTS / 'eval_share.json'}")
    write_result(RESULTS / "eval_share.json", result)


if __name__ == "__main__":
    main()
