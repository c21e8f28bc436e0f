#!/usr/bin/env python3
"""qwrap's GPTQ quantization vs a direct GPTQModel script doing the same work, on the same
tiny model with the same calibration tokens, alternating runs. Target: <= 1.10x.

Compares like with like: the direct script loads the model, quantizes (4-bit, group 128,
same samples), and saves; on the qwrap side the time is the whole `quantize` step as the
journal records it (worker start, tokenization, per-layer checkpoints, events, save). The
full `qwrap run` time, which also reloads and validates the artifact, is reported beside it.

    .venv/bin/python bench/backends_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import REPO, build_model, write_result

from qwrap import envs

SAMPLES, SEQ_LEN = 16, 128
DIRECT = textwrap.dedent("""
    import sys
    from transformers import AutoTokenizer
    from gptqmodel import GPTQModel, QuantizeConfig
    model_dir, out, corpus = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [d for d in open(corpus).read().split("\\n\\n") if d.strip()]
    rows = []
    for d in docs:
        ids = tok(d)["input_ids"][:%(seq)d]
        if len(ids) >= 16:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(rows) == %(n)d:
            break
    cfg = QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True, damp_percent=0.01)
    model = GPTQModel.load(model_dir, cfg, device="cpu")
    model.quantize(rows, batch_size=1)
    model.save(out)
""") % {"seq": SEQ_LEN, "n": SAMPLES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "backends_overhead.json")
    args = parser.parse_args()
    gptq_py = envs.find_env("gptqmodel").python
    corpus = REPO / "tests" / "data" / "corpus.txt"
    threads = str(os.cpu_count() or 1)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": threads, "OMP_NUM_THREADS": threads}
    direct_t, step_t, total_t = [], [], []
    with tempfile.TemporaryDirectory(prefix="qwrap-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / "tiny-llama", "--layers", "4")
        script = work / "direct.py"
        script.write_text(DIRECT)
        for i in range(args.runs):
            def direct() -> None:
                shutil.rmtree(work / "direct-out", ignore_errors=True)
                t = time.perf_counter()
                subprocess.run([str(gptq_py), str(script), str(model), str(work / "direct-out"), str(corpus)],
                               check=True, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                direct_t.append(time.perf_counter() - t)

            def qwrap() -> None:
                out = work / "qwrap-out"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "qwrap.cli", "run", str(model), "-o", str(out),
                                       "--format", "gptq", "--calib", str(corpus), "--calib-samples", str(SAMPLES),
                                       "--calib-seq-len", str(SEQ_LEN), "--json"],
                                      check=True, capture_output=True, text=True)
                total_t.append(time.perf_counter() - t)
                steps = {s["id"]: s["seconds"] for s in json.loads(proc.stdout)["steps"]}
                step_t.append(steps["gptq.quantize"])

            for fn in ((direct, qwrap) if i % 2 == 0 else (qwrap, direct)):
                fn()
            print(f"run {i + 1}: direct {direct_t[-1]:.1f}s  qwrap quantize step {step_t[-1]:.1f}s  "
                  f"qwrap run (with validation) {total_t[-1]:.1f}s", flush=True)
    result = {"benchmark": "backends_overhead", "backend": "gptqmodel", "format": "gptq",
              "samples": SAMPLES, "seq_len": SEQ_LEN, "direct_seconds": direct_t,
              "qwrap_quantize_step_seconds": step_t, "qwrap_run_seconds": total_t,
              "median_ratio_quantize": statistics.median(q / d for q, d in zip(step_t, direct_t, strict=False)),
              "median_ratio_whole_run": statistics.median(q / d for q, d in zip(total_t, direct_t, strict=False)),
              "target": 1.10, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
