#!/usr/bin/env python3
"""The randomized kill soak, large (tests/test_soak.py runs a few kills of it in `make test`):
a mixed plan on a tiny model - several GGUF types with an importance matrix, AWQ and GPTQ
(gptqmodel, CPU), the evaluation steps - run again and again while a random process of qwrap's
tree (qwrap itself, a tool, a worker) is SIGKILLed at a random moment of the uninterrupted run's
journal (every step's start and end, every child's start: AWQ's and GPTQ's workers too); after
each kill: no orphan process, no file under a final name the journal does not vouch for; every
completed run byte-identical to an uninterrupted one. At the default threads (the runner's
choice, which varies with what runs beside) unless --threads. Results (kills, survived, by
victim and moment, every failure) in bench/results/soak.json.

    .venv/bin/python bench/soak.py [--kills 50] [--seed 12] [--budget-s 7200] [--threads 0] [--focus awq] [--gguf-only]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import REPO, build_model, stamp, write_result

sys.path.insert(0, str(REPO / "tests"))
from soak import soak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=7200)
    parser.add_argument("--threads", type=int, default=0,
                        help="--threads for every run (0, the default: the runner's choice, which varies with "
                             "what runs beside)")
    parser.add_argument("--calib-samples", type=int, default=8, help="AWQ/GPTQ calibration samples")
    parser.add_argument("--calib-seq-len", type=int, default=64, help="AWQ/GPTQ calibration sample length")
    parser.add_argument("--focus", default="", help="kill only at the moments naming this (e.g. awq: AWQ's steps "
                        "and workers); default every moment")
    parser.add_argument("--gguf-only", action="store_true", help="no AWQ, no GPTQ and no evaluation (a faster soak)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    corpus = REPO / "tests" / "data" / "corpus.txt"
    with tempfile.TemporaryDirectory(prefix="qwrap-soak-") as tmp:
        work = Path(tmp)
        model = build_model(work / "tiny-llama")
        calib = work / "calib.txt"
        calib.write_text(corpus.read_text()[:20000])
        plan = ["-q", "Q4_K_M", "-q", "Q5_K_M", "-q", "Q8_0", "--imatrix", "auto", "--calib", str(calib)]
        if args.gguf_only:
            plan += ["--no-eval"]
        else:
            plan += ["--format", "gguf", "--format", "awq", "--format", "gptq",  # AWQ/GPTQ: gptqmodel
                     "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
                     "--eval-text", str(calib), "--eval-tokens", "2048"]
        if args.threads:
            plan += ["--threads", str(args.threads)]
        result = soak(model, work, plan, kills=args.kills, seed=args.seed, budget_s=args.budget_s, focus=args.focus)
    result["args"] = [a if not a.startswith(tmp) else Path(a).name for a in result["args"]]
    write_result(args.out, {**stamp(), **result})
    print(f"{result['survived']}/{result['kills']} kills survived in {result['seconds']:.0f} s "
          f"({result['completed_runs']} completed runs); by victim: {result['by_victim']}; "
          f"by moment: {result['by_moment']} -> {args.out}")
    sys.exit(0 if result["survived"] == result["kills"] else 1)


if __name__ == "__main__":
    main()
