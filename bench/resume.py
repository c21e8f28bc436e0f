#!/usr/bin/env python3
"""Resume cost: kill a multi-type run at about half its work, rerun, and compare the rerun's
time with the work that was actually left (target: <= remaining + 5%).

1. An uninterrupted run gives each step's duration (from --json).
2. A second run into a fresh folder is SIGKILLed at half the total time.
3. The same command is rerun; "remaining" = the durations (from step 1) of every step the
   killed run had not finished, including the one it was in.

    .venv/bin/python bench/resume.py [--quants Q4_K_M Q5_K_M Q6_K Q8_0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, build_model, write_result

from qwrap.journal import Journal


def qwrap(model: Path, out: Path, quants: list[str]) -> list[str]:
    return [sys.executable, "-m", "qwrap.cli", "run", str(model), "-o", str(out), "--json",
            *[a for q in quants for a in ("-q", q)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quants", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "resume.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwrap-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / "bench-100m", "--params-100m")
        start = time.perf_counter()
        full = subprocess.run(qwrap(model, work / "full", args.quants), check=True, capture_output=True, text=True)
        total = time.perf_counter() - start
        durations = {s["id"]: s["seconds"] or 0.0 for s in json.loads(full.stdout)["steps"]}
        shutil.rmtree(work / "full")

        out = work / "killed"
        proc = subprocess.Popen(qwrap(model, out, args.quants), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(total / 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = {s for s, st in Journal(out).states().items() if st.state == "done"}
        remaining = sum(d for step, d in durations.items() if step not in done)

        start = time.perf_counter()
        again = subprocess.run(qwrap(model, out, args.quants), check=True, capture_output=True, text=True)
        rerun = time.perf_counter() - start
        rerun_steps = {s["id"]: s for s in json.loads(again.stdout)["steps"]}
        redone = {i for i, s in rerun_steps.items() if s["state"] == "done"}
        redone_seconds = sum(rerun_steps[i]["seconds"] or 0.0 for i in redone)
    result = {"benchmark": "resume", "quants": args.quants, "uninterrupted_seconds": total,
              "killed_at_seconds": total / 2, "steps_done_before_kill": sorted(done),
              "remaining_step_seconds": remaining, "rerun_seconds": rerun,
              "ratio": rerun / remaining if remaining else None, "target": 1.05,
              # Tool runs vary by +-1 s here, so also: did the rerun redo exactly the steps
              # that were not done, and what did it cost beyond those steps in the same run?
              "rerun_redid_exactly_the_remaining_steps": redone == set(durations) - done,
              "rerun_step_seconds": redone_seconds,
              "uninterrupted_steps": durations,
              "rerun_steps": {i: rerun_steps[i]["seconds"] for i in sorted(redone)},
              "rerun_wall_over_own_steps": rerun / redone_seconds if redone_seconds else None,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
