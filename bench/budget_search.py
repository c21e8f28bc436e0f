#!/usr/bin/env python3
"""Size budgets (`--target-size`): the searched per-tensor recipe against the stock llama.cpp mix
of the same size, on one trained model, measured on >= 30k scored tokens of held-out text.

1. The text: tests/data/corpus.txt followed by the Python standard library's language reference
   (`pydoc_data.topics`, every topic in key order, blank lines between), written to the cache
   as budget-corpus-SHA.txt. English prose and code, offline on every machine.
2. The model: `scripts/make-tiny-model --cached` (converter environment's Python) trains a
   4-layer Llama on it for 300 steps; the last --held-out percent of its tokens is never
   trained on and becomes texts/held-out.txt, the rest texts/train.txt (the calibration text).
3. The stock files: `qwrap run -q Q4_K_M -q Q3_K_M` (importance matrix from train.txt) gives
   their exact sizes (the budgets) and its 16-bit GGUF and importance matrix, with which
   `llama-quantize Q4_K_M` is timed by hand (all cores, median of --repeats): one stock
   quantization.
4. The budgets: ONE `qwrap run --target-size Q4_K_M_BYTES --target-size Q3_K_M_BYTES`, timed,
   with an empty statistics cache (QWRAP_STATS_DIR), so the sensitivity probes are measured.
   Per budget, from the journal: the stock file it compared with (quantized and measured on the
   same tokens), the searched file, which one qwrap chose and why.
5. A rerun into a fresh folder with a third size (halfway between) and the same statistics
   cache: the sensitivity is reused, not measured again.

Results: bench/results/budget_search.json and .md.

    .venv/bin/python bench/budget_search.py [--held-out 35] [--chunks 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import QWRAP, REPO, RESULTS, journal_steps, run_timed, stamp, write_result

from qwrap import envs  # noqa: E402  (_common puts wrapper/ on the path)
from qwrap.toolchain import cache_root, find_toolchain  # noqa: E402

CTX = 512
SCORED_PER_CHUNK = CTX - 1 - CTX // 2  # llama-perplexity scores the second half of each chunk
MIN_SCORED = 30_000
STOCK = ("Q4_K_M", "Q3_K_M")
MODEL_ARGS = ("--layers", "4", "--train-steps", "300", "--train-seq-len", "512", "--train-batch", "2", "--texts")
NOISE_SIGMAS = 2  # as qwrap's quality.within_noise: two combined standard errors


# -- the text and the model -----------------------------------------------------------------


def corpus_text() -> str:
    """tests/data/corpus.txt, then every topic of the running Python's pydoc_data.topics (the
    language reference), in key order; documents separated by blank lines."""
    import pydoc_data.topics as topics

    corpus = (REPO / "tests" / "data" / "corpus.txt").read_text(encoding="utf-8").strip()
    reference = "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics))
    return corpus + "\n\n" + reference + "\n"


def write_corpus() -> Path:
    data = corpus_text().encode("utf-8")
    path = cache_root() / "bench" / f"budget-corpus-{hashlib.sha256(data).hexdigest()[:12]}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def build_model(corpus: Path, held_out: int) -> tuple[Path, float]:
    """The trained model, built once into the cache (make-tiny-model --cached); seconds spent."""
    python = envs.find_env("convert").python
    argv = [str(python), str(REPO / "scripts" / "make-tiny-model"), "--cached", str(cache_root() / "bench-models"),
            "--corpus", str(corpus), "--held-out", str(held_out), *MODEL_ARGS]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return Path(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


# -- runs -----------------------------------------------------------------------------------


def count_tokens(model: Path, *texts: Path) -> list[int]:
    """Tokens of each text with the model's own tokenizer (as llama-perplexity reads it: no BOS)."""
    code = ("import sys; from tokenizers import Tokenizer; t = Tokenizer.from_file(sys.argv[1]); "
            "print(*(len(t.encode(open(f, encoding='utf-8').read(), add_special_tokens=False).ids) "
            "for f in sys.argv[2:]))")
    proc = subprocess.run([str(envs.find_env("convert").python), "-c", code, str(model / "tokenizer.json"),
                           *map(str, texts)], check=True, stdout=subprocess.PIPE, text=True)
    return [int(n) for n in proc.stdout.split()]


def qwrap_run(model: Path, out: Path, chunks: int, *extra: str, stats: Path) -> tuple[float, dict[str, dict[str, Any]]]:
    texts = model / "texts"
    argv: list[str | os.PathLike[str]] = [
        QWRAP, "run", model, "-f", "gguf", "-o", out, "--calib", texts / "train.txt", "--eval-text",
        texts / "held-out.txt", "--eval-ctx", str(CTX), "--eval-tokens", str(chunks * CTX), *extra]
    print("+ " + " ".join(map(str, argv)), f"(QWRAP_STATS_DIR={stats})", flush=True)
    timed = run_timed(argv, env={**os.environ, "QWRAP_STATS_DIR": str(stats)})
    return timed.wall, journal_steps(out)


def time_quantize(f16: Path, imatrix: Path, quant: str, work: Path, repeats: int) -> list[float]:
    """`llama-quantize --imatrix` by hand with every core, as a user would run it."""
    tool = find_toolchain().tool("llama-quantize")
    times = []
    for _ in range(repeats):
        out = work / f"hand-{quant}.gguf"
        times.append(run_timed([tool, "--imatrix", imatrix, f16, out, quant, str(os.cpu_count() or 1)]).wall)
        out.unlink()
    return times


def quality_row(quality: dict[str, Any]) -> dict[str, Any]:
    keys = ("kld_mean", "kld_mean_se", "kld_p99", "top1_agreement", "top1_agreement_se", "delta_ppl", "delta_ppl_se",
            "ppl", "ppl_base", "tokens")
    return {k: quality.get(k) for k in keys}


def perplexity_runs(log: Path) -> int:
    """llama-perplexity starts in a step's log (qwrap repeats one that ends without its result)."""
    return sum(1 for line in log.read_text(errors="replace").splitlines()
               if line.startswith("$ ") and "llama-perplexity" in line)


def budget_row(label: str, steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    choose = steps[f"gguf.choose:{label}"]["info"]
    search = steps[f"gguf.search:{label}"]["info"]
    searched, stock = choose["searched"], choose["stock"]
    s_kld, k_kld = searched["quality"]["kld_mean"], stock["quality"]["kld_mean"]
    s_se, k_se = searched["quality"].get("kld_mean_se"), stock["quality"].get("kld_mean_se")
    noise = NOISE_SIGMAS * (s_se ** 2 + k_se ** 2) ** 0.5 if s_se is not None and k_se is not None else None
    return {
        "label": label, "budget_bytes": choose["budget_bytes"],
        "stock": {"quant": stock["quant"], "bytes": stock["bytes"], "dry_run_bytes": search.get("stock_bytes"),
                  **quality_row(stock["quality"])},
        "searched": {"base_quant": searched["quant"], "bytes": searched["bytes"], **quality_row(searched["quality"]),
                     "predicted_kld": search.get("predicted_kld"), "predicted_bytes": search.get("predicted_bytes"),
                     "types": search.get("types")},
        "kld_change": (s_kld - k_kld) / k_kld if k_kld else None,
        "noise_2se": noise, "beyond_noise": noise is not None and abs(s_kld - k_kld) > noise,
        "bytes_change": searched["bytes"] - stock["bytes"],
        "key_types": {g: (search.get("types") or {}).get(g) for g in ("token_embd", "output")},
        "chosen": choose["chosen"], "reason": choose["reason"],
        "seconds": {step: steps[f"{step}:{label}"].get("seconds")
                    for step in ("gguf.search", "gguf.quantize", "gguf.eval", "gguf.compare", "gguf.choose")},
    }


def stock_key_types(logs: Path, labels: list[str]) -> dict[str, dict[str, str]]:
    """token_embd's and output's types in each stock mix, from a search step's dry runs."""
    import re

    found: dict[str, dict[str, str]] = {}
    quant = None
    for line in (logs / f"gguf.search-{labels[0]}.log").read_text(errors="replace").splitlines():
        if line.startswith("$ ") and "--dry-run" in line:
            quant = line.split()[-2]  # ... OUT.gguf TYPE THREADS
            found[quant] = {}
        m = re.search(r"\]\s+(token_embd|output)\.weight\s.*\((\w+)\)\s*$", line)
        if m and quant:
            found[quant][m.group(1)] = m.group(2)
    return found


# -- the page -------------------------------------------------------------------------------


def kld(row: dict[str, Any]) -> str:
    se = row.get("kld_mean_se")
    return f"{row['kld_mean']:.6f} ± {se:.6f}" if se is not None else f"{row['kld_mean']:.6f}"


def pm(row: dict[str, Any], key: str, fmt: str) -> str:
    se = row.get(f"{key}_se")
    return f"{row[key]:{fmt}} ± {se:{fmt}}" if se is not None else f"{row[key]:{fmt}}"


def table(result: dict[str, Any]) -> str:
    """The budgets at the stock types' sizes; stock bytes: the `-q` file (= the budget)."""
    sizes = result["stock_run"]["sizes"]
    lines = ["| budget = stock size (bytes) | stock KLD | searched bytes | searched KLD | KLD change | "
             "noise (2σ) | beyond noise | shipped |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["budgets"]:
        q = r["stock"]["quant"]
        noise = f"±{r['noise_2se']:.6f}" if r["noise_2se"] is not None else "?"
        lines.append(f"| {q}: {sizes.get(q, r['stock']['bytes']):,} | {kld(r['stock'])} | {r['searched']['bytes']:,} | "
                     f"{kld(r['searched'])} | **{100 * r['kld_change']:+.1f}%** | {noise} | "
                     f"{'yes' if r['beyond_noise'] else 'no'} | {r['chosen']} |")
    return "\n".join(lines)


def other_figures(result: dict[str, Any]) -> str:
    lines = ["| budget | file | KLD p99 | top-1 agreement | ΔPPL (PPL base " f"{result['budgets'][0]['stock']['ppl_base']:.1f}) | "
             "token_embd / output |",
             "|---|---|---|---|---|---|"]
    for r in result["budgets"]:
        for name, row, types in (("stock " + r["stock"]["quant"], r["stock"], r["stock_key_types"]),
                                 ("searched", r["searched"], r["key_types"])):
            lines.append(f"| {r['stock']['quant']} size | {name} | {row['kld_p99']:.5f} | {pm(row, 'top1_agreement', '.4f')} | "
                         f"{pm(row, 'delta_ppl', '.3f')} | {types.get('token_embd')} / {types.get('output')} |")
    return "\n".join(lines)


def ppl_note(result: dict[str, Any]) -> str:
    """Where the searched file's ΔPPL is higher than the stock one's beyond noise, say so: ΔPPL is a
    signed mean over the scored tokens (errors of either sign cancel), KLD is not."""
    worse = []
    for r in result["budgets"]:
        a, b = r["searched"], r["stock"]
        se = ((a.get("delta_ppl_se") or 0) ** 2 + (b.get("delta_ppl_se") or 0) ** 2) ** 0.5
        if a["delta_ppl"] - b["delta_ppl"] > NOISE_SIGMAS * se:
            worse.append(f"{b['quant']} size ({a['delta_ppl']:.3f} vs {b['delta_ppl']:.3f}, noise ±{NOISE_SIGMAS * se:.3f})")
    if not worse:
        return "The searched files' ΔPPL is not higher than the stock ones' beyond noise."
    return ("The searched file's ΔPPL is higher than the stock one's beyond noise at " + ", ".join(worse)
            + ", although its KLD, KLD p99 and top-1 agreement are better: ΔPPL is a signed mean over the "
              "scored tokens, where errors of either sign cancel; KLD is not.")


def over(result: dict[str, Any]) -> str:
    """The compare step's copy of a stock type is not always the size `-q` gives (metadata)."""
    sizes = result["stock_run"]["sizes"]
    diffs = {r["stock"]["quant"]: r["stock"]["bytes"] - sizes[r["stock"]["quant"]]
             for r in result["budgets"] if r["stock"]["quant"] in sizes}
    if not any(diffs.values()):
        return ""
    return ("The stock file qwrap's compare step made (same tensors, same KLD) was "
            + ", ".join(f"{d:+} bytes ({q})" for q, d in diffs.items())
            + " against `-q`'s, so over the budget: its `quantize.imatrix.file` metadata holds the importance "
              "matrix's absolute path where `-q` writes a relative one. ")


def page(result: dict[str, Any]) -> str:
    m, c, cost, rerun = result["model"], result["corpus"], result["cost"], result["rerun"]
    groups = ", ".join(f"{g} {d:+.2g}" for g, d in result["sensitivity"]["largest"])
    return f"""# Size budgets: searched recipe vs stock mix (`bench/budget_search.py`)

{result['date']}, {result['cpus']} cores, no GPU. Model: a {m['layers']}-layer Llama (hidden {m['hidden']},
vocab {m['vocab']}, {m['parameters']:,} parameters, bf16) trained by `scripts/make-tiny-model {' '.join(m['args'])}`
on {c['description']} ({c['bytes']:,} bytes, {c['tokens']:,} tokens; sha256 {c['sha256'][:12]}…). The last
{m['held_out_percent']}% of its tokens were never trained on: texts/held-out.txt ({c['held_out_tokens']:,} tokens, the end of the
language reference). Calibration (importance matrix, sensitivity probes): texts/train.txt
({c['train_tokens']:,} tokens). KLD against the 16-bit GGUF on
{result['eval']['chunks']} chunks of {CTX} tokens of held-out text, **{result['eval']['scored_tokens']:,} scored tokens**; the searched
file and the stock one are measured on the same tokens in the same run. ± is the standard error
of the mean KLD; "beyond noise" means the difference exceeds two combined standard errors.

{table(result)}

Target: KLD ≥ 20% lower than stock at equal or smaller size, never worse. Each budget is the
exact size of the file `qwrap run -q {STOCK[0]}` (`-q {STOCK[1]}`) makes. {over(result)}qwrap's reasons:
{'; '.join('"' + r['reason'] + '"' for r in result['budgets'])}.

Other figures on the same tokens (± standard errors). {ppl_note(result)}

{other_figures(result)}

The search's predicted KLD (on calibration text) against the measured one:
{', '.join(f"{r['stock']['quant']} size {r['searched']['predicted_kld']:.6f} vs {r['searched']['kld_mean']:.6f}" for r in result['budgets'])}.

Cost (one `qwrap run` with both budgets: {result['budget_run']['wall_s']:.0f} s wall; the stock run of the two
types, same evaluation: {result['stock_run']['wall_s']:.0f} s):

- one stock quantization (`llama-quantize --imatrix … Q4_K_M`, {result['cpus']} threads, median of
  {len(cost['stock_quantize_s'])}): **{cost['stock_quantize_median_s']:.2f} s**
- sensitivity ({result['sensitivity']['groups']} groups, {result['sensitivity']['probes']} probes, each a quantization and a
  KLD pass over {result['sensitivity']['tokens']:,} calibration tokens; {result['sensitivity']['perplexity_runs']} llama-perplexity runs for
  {result['sensitivity']['probes'] + 1} measurements, the rest repeats of runs that ended without their result):
  {cost['sensitivity_s']:.1f} s; the searches
  (allocation + dry runs of the stock types): {cost['search_s']:.1f} s
- **(sensitivity + search) = {cost['search_multiple']:.0f}× one stock quantization**; per budget after the
  first (search only): {cost['per_extra_budget_multiple']:.1f}×
- rerun with a third size ({rerun['budget_bytes']:,} bytes) into a fresh folder: sensitivity
  {'reused from the cache' if rerun['sensitivity_reused'] else 'MEASURED AGAIN'} ({rerun['sensitivity_s']:.2f} s instead of {cost['sensitivity_s']:.0f} s), whole run
  {rerun['wall_s']:.0f} s; that budget: {rerun['row']['chosen']} shipped, KLD {kld(rerun['row']['searched'])} vs
  {rerun['row']['stock']['quant']} {kld(rerun['row']['stock'])}

Largest measured group sensitivities (KLD increase when the group alone drops to its probe type):
{groups}.

Python {result['python']}; load average before/after: {result['load_before']} / {result['load_after']}
(the machine is shared: timings carry that noise).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", type=int, default=35, help="percent of the corpus held out of training")
    ap.add_argument("--chunks", type=int, default=128, help=f"evaluation chunks of {CTX} tokens")
    ap.add_argument("--repeats", type=int, default=3, help="hand-run stock quantizations to time")
    ap.add_argument("--work", type=Path, help="keep the output folders here (default: a temporary folder)")
    args = ap.parse_args()
    if args.chunks * SCORED_PER_CHUNK < MIN_SCORED:
        ap.error(f"--chunks {args.chunks} scores {args.chunks * SCORED_PER_CHUNK} tokens, under {MIN_SCORED}")
    load_before = os.getloadavg()
    corpus = write_corpus()
    model, build_s = build_model(corpus, args.held_out)
    print(f"model: {model} ({build_s:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="qwrap-bench-budget-") as tmp:
        work = args.work or Path(tmp)
        for name in ("stock", "budget", "rerun", "stats-stock", "stats-budget"):
            shutil.rmtree(work / name, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)

        # 3. the stock files, their sizes, and one stock quantization timed by hand
        stock_wall, stock_steps = qwrap_run(model, work / "stock", args.chunks,
                                            *[a for q in STOCK for a in ("-q", q)], "--keep-intermediate",
                                            stats=work / "stats-stock")
        scored = stock_steps["gguf.eval-base"]["info"]["chunks"] * SCORED_PER_CHUNK
        if scored < MIN_SCORED:
            sys.exit(f"the held-out text gave {scored} scored tokens, under {MIN_SCORED}: raise --held-out")
        sizes = {q: (work / "stock" / f"{model.name}-{q}.gguf").stat().st_size for q in STOCK}
        stock_quality = {q: quality_row(stock_steps[f"gguf.eval:{q}"]["info"]["quality"]) for q in STOCK}
        checkpoint = work / "stock" / ".checkpoint" / "work"
        f16 = next(checkpoint.glob(f"{model.name}-*16.gguf"))
        hand = time_quantize(f16, checkpoint / "imatrix.gguf", "Q4_K_M", work, args.repeats)
        print(f"stock sizes {sizes}; llama-quantize Q4_K_M {hand}", flush=True)

        # 4. one run with both budgets, the sensitivity measured (an empty statistics cache)
        budget_argv = [a for q in STOCK for a in ("--target-size", str(sizes[q]))]
        budget_wall, steps = qwrap_run(model, work / "budget", args.chunks, *budget_argv, stats=work / "stats-budget")
        labels = [s.split(":", 1)[1] for s in steps if s.startswith("gguf.choose:")]
        rows = sorted((budget_row(label, steps) for label in labels), key=lambda r: -r["budget_bytes"])
        sens_step = steps["gguf.sensitivity"]
        if sens_step["info"].get("reused_from_cache"):
            sys.exit("the sensitivity was reused from a cache: the cost figures would be wrong")
        sens_s = sens_step["seconds"]
        search_s = [steps[f"gguf.search:{label}"]["seconds"] for label in labels]
        sens_runs = perplexity_runs(work / "budget" / ".checkpoint" / "logs" / "gguf.sensitivity.log")
        stock_types = stock_key_types(work / "budget" / ".checkpoint" / "logs", labels)
        kept = next((work / "stats-budget").glob("sensitivity-*.json"))
        sens = json.loads(kept.read_text())
        deltas = sens["sensitivity"]["delta"]

        # 5. a third size, another folder, the same statistics cache
        third = (sizes[STOCK[0]] + sizes[STOCK[1]]) // 2
        rerun_wall, rerun_steps = qwrap_run(model, work / "rerun", args.chunks, "--target-size", str(third),
                                            stats=work / "stats-budget")
        rerun_label = next(s.split(":", 1)[1] for s in rerun_steps if s.startswith("gguf.choose:"))

    for row in rows:
        row["stock_key_types"] = stock_types.get(row["stock"]["quant"], {})
    median_q = statistics.median(hand)
    config = json.loads((model / "config.json").read_text())
    text = corpus.read_text(encoding="utf-8")
    tokens = count_tokens(model, corpus, model / "texts" / "train.txt", model / "texts" / "held-out.txt")
    result = {
        "benchmark": "budget_search",
        "corpus": {"description": "tests/data/corpus.txt followed by the Python standard library's language "
                                  "reference (pydoc_data.topics, every topic in key order)",
                   "path": str(corpus), "bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "tokens": tokens[0], "train_tokens": tokens[1], "held_out_tokens": tokens[2],
                   "held_out_bytes": (model / "texts" / "held-out.txt").stat().st_size,
                   "train_bytes": (model / "texts" / "train.txt").stat().st_size},
        "model": {"path": str(model), "args": ["--corpus", "CORPUS", "--held-out", str(args.held_out), *MODEL_ARGS],
                  "layers": config["num_hidden_layers"], "hidden": config["hidden_size"], "vocab": config["vocab_size"],
                  "parameters": steps["gguf.convert"]["info"]["parameter_count"], "held_out_percent": args.held_out,
                  "build_s": build_s},
        "eval": {"ctx": CTX, "chunks": steps["gguf.eval-base"]["info"]["chunks"],
                 "scored_tokens": rows[0]["searched"]["tokens"]},
        "stock_run": {"wall_s": stock_wall, "sizes": sizes, "quality": stock_quality,
                      "quantize_s": {q: stock_steps[f"gguf.quantize:{q}"]["seconds"] for q in STOCK}},
        "budget_run": {"wall_s": budget_wall, "argv_budgets": budget_argv,
                       "steps_s": {s: r.get("seconds") for s, r in steps.items()}},
        "budgets": rows,
        "sensitivity": {"groups": sens_step["info"]["groups"], "probes": sens_step["info"]["probes"],
                        "tokens": sens_step["info"]["tokens"], "seconds": sens_s, "perplexity_runs": sens_runs,
                        "largest": sorted(deltas.items(), key=lambda kv: -kv[1])[:6], "all": sens["sensitivity"]},
        "cost": {"stock_quantize_s": hand, "stock_quantize_median_s": median_q, "sensitivity_s": sens_s,
                 "search_s": sum(search_s), "search_s_each": search_s,
                 "search_multiple": (sens_s + sum(search_s)) / median_q,
                 "per_extra_budget_multiple": statistics.mean(search_s) / median_q,
                 "budget_run_over_stock_run": budget_wall / stock_wall},
        "rerun": {"budget_bytes": third, "wall_s": rerun_wall,
                  "sensitivity_reused": bool(rerun_steps["gguf.sensitivity"]["info"].get("reused_from_cache")),
                  "sensitivity_s": rerun_steps["gguf.sensitivity"]["seconds"],
                  "row": budget_row(rerun_label, rerun_steps)},
        "python": sys.version.split()[0], "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], **stamp(),
    }
    write_result(RESULTS / "budget_search.json", result)
    (RESULTS / "budget_search.md").write_text(page(result))
    print(page(result))


if __name__ == "__main__":
    main()
