#!/usr/bin/env python3
"""`qwrap --help` start-up time: the median wall time of N runs of .venv/bin/qwrap --help
(target <= 0.25 s), and the 15 imports with the largest cumulative time under
`python -X importtime` for the same command, saved in bench/results/help_time.json.

    .venv/bin/python bench/help_time.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from _common import QWRAP, RESULTS, median, stamp, write_result

TARGET = 0.25


def import_times(argv: list[str]) -> list[dict]:
    """Parse `-X importtime` lines: 'import time: self [us] | cumulative | package'."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    err = subprocess.run([str(QWRAP.parent / "python"), "-X", "importtime", *argv], capture_output=True, text=True,
                         env=env).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line.removeprefix("import time:").split("|", 2)
        rows.append({"module": name.strip(), "self_us": int(self_us), "cumulative_us": int(cum_us)})
    return sorted(rows, key=lambda r: -r["cumulative_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "help_time.json")
    args = parser.parse_args()
    argv = [str(QWRAP), "--help"]
    # as installed from a wheel (pip compiles the .pyc files): a host that sets
    # PYTHONDONTWRITEBYTECODE would otherwise compile every changed module on every run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(argv, check=True, capture_output=True, env=env)  # warm the page cache and .pyc files
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
    imports = import_times(argv)
    result = {"benchmark": "help_time", "runs": args.runs, "seconds": times, "median_seconds": median(times),
              "min_seconds": min(times), "target": TARGET, "imports_total": len(imports),
              "top_cumulative_imports": imports[:15], **stamp()}
    write_result(args.out, result)
    ok = result["median_seconds"] <= TARGET
    print(f"qwrap --help median {result['median_seconds']:.3f}s over {args.runs} runs "
          f"(target <= {TARGET}s: {'PASS' if ok else 'FAIL'}) -> {args.out}")
    for r in imports[:15]:
        print(f"  {r['cumulative_us'] / 1000:8.1f} ms  {r['module']}")


if __name__ == "__main__":
    main()
