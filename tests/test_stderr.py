"""Honest figures: every quality figure carries its standard error, computed as llama-perplexity
computes it (parsed from its own output, and the same statistics in torch for transformers), and
rendered as "value ± error"; differences within noise are marked; `plan` says how precise the
evaluation it plans will be."""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from background import Lane, prefetch, prefetched
from conftest import REPO, _missing, run_qwrap
from qwrap import evaltext, modelcard, quality, qualitypage, report, results
from qwrap.quality import (
    FIGURES,
    SE_KEYS,
    Quality,
    figure,
    noise_pairs,
    parse_base_estimate,
    parse_kld_summary,
    within_noise,
)

RECORDED = REPO / "tests" / "data" / "recorded"
SUMMARY_SE = re.compile(r"^(Mean PPL\(Q\)|Mean PPL\(base\)|Mean PPL\(Q\)-PPL\(base\)|Mean\s+KLD|Same top p)\s*:"
                        r"\s*(\S+)\s*±\s*(\S+)")
SE_OF = {"Mean PPL(Q)": "ppl_se", "Mean PPL(base)": "ppl_base_se", "Mean PPL(Q)-PPL(base)": "delta_ppl_se",
         "Mean KLD": "kld_mean_se", "Same top p": "top1_agreement_se"}


def printed_errors(lines: list[str]) -> dict[str, float]:
    """The ± of llama-perplexity's summary lines, read with a regular expression of the test's
    own (percentages as shares)."""
    found: dict[str, float] = {}
    for line in lines:
        m = SUMMARY_SE.match(line.strip())
        if m:
            key = SE_OF[re.sub(r"\s+", " ", m[1])]
            found[key] = float(m[3]) / (100 if key == "top1_agreement_se" else 1)
    return found


# -- parsing llama-perplexity's own output --------------------------------------------------


def test_the_summary_errors_are_parsed_from_recorded_output() -> None:
    lines = (RECORDED / "llama-perplexity-kld.log").read_text().splitlines()
    q = parse_kld_summary(lines)
    assert {k for f in FIGURES if (k := f.se_key) is not None} == SE_KEYS <= set(q)
    assert "kld_p99_se" not in q  # a quantile has none
    assert {k: q[k] for k in SE_KEYS} == pytest.approx(printed_errors(lines))
    assert q["kld_mean_se"] == pytest.approx(0.000059) and q["top1_agreement_se"] == pytest.approx(0.01348)
    # the base run's "Final estimate: PPL = X +/- Y"
    ppl, se = parse_base_estimate((RECORDED / "llama-perplexity-base.log").read_text().splitlines())
    assert ppl == pytest.approx(4235.1258) and se == pytest.approx(41.11547)
    # a summary without the errors still gives its figures
    bare = [re.sub(r"\s*±\s*\S+", "", line) for line in lines]
    assert set(parse_kld_summary(bare)) == quality.FIGURE_KEYS


def test_each_figure_is_shown_with_its_error() -> None:
    q = Quality.from_json(parse_kld_summary((RECORDED / "llama-perplexity-kld.log").read_text().splitlines()))
    shown = {f.key: f.text(q) for f in FIGURES}
    assert shown == {"kld_mean": "0.01387 ± 0.000059", "kld_p99": "0.01829", "ppl": "4206.72 ± 43",
                     "ppl_base": "4235.13 ± 41", "delta_ppl": "-28.41 ± 22", "top1_agreement": "24.4% ± 1.3%"}
    assert figure("kld_mean").text(q, se=False) == "0.01387"
    tiny = Quality({"kld_mean": 3.9e-05, "kld_mean_se": 1e-06})
    assert figure("kld_mean").text(tiny) == "3.9e-05 ± 1.0e-06"  # one notation for both


def test_a_result_without_errors_still_loads_and_renders_bare() -> None:
    """A qwrap.result/2 document written before the errors were kept: no ±, nothing fails."""
    old = {"kld_mean": 0.0412, "kld_p99": 0.41, "ppl": 21.5, "ppl_base": 21.4, "delta_ppl": 0.1,
           "top1_agreement": 0.93, "tokens": 126, "ctx": 128, "runtime": "llama.cpp", "weights": None}
    q = Quality.from_json(old)
    assert [f.text(q) for f in FIGURES] == ["0.0412", "0.41", "21.50", "21.40", "+0.1", "93.0%"]
    assert q.kld_mean_se is None and not within_noise(q, q)  # no error: nothing is called noise
    doc = q.to_json()
    assert all(doc[k] is None for k in SE_KEYS) and Quality.from_json(doc) == q
    with pytest.raises(quality.SchemaError, match="kld_p99_se"):
        Quality.from_json({**old, "kld_p99_se": 0.01})


# -- within noise ---------------------------------------------------------------------------


def test_within_noise_is_two_combined_standard_errors() -> None:
    a = Quality({"kld_mean": 0.0100, "kld_mean_se": 0.0003}, runtime="llama.cpp")
    edge = 2 * math.hypot(0.0003, 0.0004)
    near = Quality({"kld_mean": 0.0100 + 0.99 * edge, "kld_mean_se": 0.0004}, runtime="llama.cpp")
    far = Quality({"kld_mean": 0.0100 + 1.01 * edge, "kld_mean_se": 0.0004}, runtime="llama.cpp")
    assert quality.combined_se(a, near) == pytest.approx(0.0005)
    assert within_noise(a, near) and within_noise(near, a) and not within_noise(a, far)
    assert within_noise(a, far, sigmas=3.0)
    assert not within_noise(a, Quality({"kld_mean": 0.0100}))  # an unknown error is not noise
    ppl = Quality({"ppl": 10.0, "ppl_se": 0.2}), Quality({"ppl": 10.5, "ppl_se": 0.2})
    assert within_noise(*ppl, key="ppl") and not within_noise(*ppl, key="ppl", sigmas=1.0)
    with pytest.raises(KeyError):
        within_noise(a, a, key="kld_p99_se")
    # pairs: among the same runtime only, each pair once, in the order given
    other = Quality({"kld_mean": 0.0100, "kld_mean_se": 0.0003}, runtime="transformers")
    items = [("A", a), ("B", near), ("C", far), ("D", other), ("E", None)]
    assert noise_pairs(items) == [("A", "B"), ("B", "C")]


# -- `plan` says how precise the evaluation will be ------------------------------------------------


def test_the_expected_error_shrinks_with_the_square_root_of_the_tokens() -> None:
    ev = evaltext.Evaluation("sha256:" + "e" * 64, "eval.txt", None, 512, 32)
    assert ev.scored == 32 * 255
    doc = evaltext.precision(ev.scored, [0.05])
    assert doc["kld_relative_se"] == pytest.approx(evaltext.KLD_SPREAD / math.sqrt(32 * 255), abs=1e-6)
    assert doc["kld_se_at"] == [{"kld": 0.05, "se": pytest.approx(0.05 * evaltext.KLD_SPREAD / math.sqrt(32 * 255))}]
    four = evaltext.precision(4 * ev.scored)
    assert four["kld_relative_se"] == pytest.approx(doc["kld_relative_se"] / 2, rel=1e-4)
    assert four["kld_se_at"][0]["kld"] == evaltext.REFERENCE_KLD


def test_the_plan_line_names_the_tokens_and_the_limits() -> None:
    ev = evaltext.Evaluation("sha256:" + "e" * 64, "eval.txt", None, 256, 16)
    doc = evaltext.planned_precision(ev, ["0.05", "Q2_K=0.2", "awq=0.05"])
    assert doc is not None and doc["tokens_scored"] == 16 * 127 and doc["at_limits"]
    assert [e["kld"] for e in doc["kld_se_at"]] == [0.05, 0.2]
    text = evaltext.precision_text(doc)
    se = evaltext.KLD_SPREAD * 0.05 / math.sqrt(16 * 127)
    assert text.startswith("2,032 tokens will be scored") and f"± {se:.2g} at 0.05" in text
    assert "(the --max-kld limits)" in text and "within noise" in text
    plain = evaltext.planned_precision(ev, [])
    assert plain is not None and not plain["at_limits"] and "5-bit" in evaltext.precision_text(plain)
    assert evaltext.planned_precision(None, ["0.05"]) is None  # --no-eval: nothing to say


@pytest.mark.slow
def test_plan_says_how_many_tokens_are_scored_and_the_error_that_gives(tiny_model: Path, corpus: Path,
                                                                       tmp_path: Path) -> None:
    args = ["plan", str(tiny_model), "-o", str(tmp_path / "o"), "-q", "Q4_K_M", "--eval-text", str(corpus),
            "--eval-tokens", "4096", "--eval-ctx", "256", "--max-kld", "0.05"]
    proc = run_qwrap(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    scored = 16 * (256 - 1 - 128)
    assert doc["evaluation"]["tokens_scored"] == scored and doc["evaluation"]["kld_se_at"][0]["kld"] == 0.05
    (check,) = [c for c in doc["checks"] if c["name"] == "evaluation precision"]
    assert check["ok"] and check["detail"] == evaltext.precision_text(doc["evaluation"])
    printed = run_qwrap(*args, env={"COLUMNS": "400"})
    assert printed.returncode == 0, printed.stderr
    assert f"evaluation precision: {scored:,} tokens will be scored" in printed.stdout + printed.stderr


# -- the standard errors of a real torch computation ----------------------------------------------

TORCH_CHILD = r"""
import json, math, statistics, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from qwrap.workers import hf_eval

model_dir, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ids = tok(open(text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
chunks = [[tok.bos_token_id, *ids[i * 128 + 1:(i + 1) * 128]] for i in range(6)]
with torch.inference_mode():
    ref = hf_eval.scored_logprobs(model, chunks, "cpu", "reference")
    for p in model.parameters():  # 4-bit round-to-nearest per row: a real quantization error
        if p.dim() == 2:
            scale = p.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 7
            p.copy_((p / scale).round().clamp(-8, 7) * scale)
    got = hf_eval.scored_logprobs(model, chunks, "cpu", "quantized")
tgt = hf_eval.targets(chunks)
figures = hf_eval.figures(ref, got, tgt, 128)
kld = (ref.exp() * (ref - got)).sum(-1).double().tolist()
nll_ref = [-float(ref[i, t]) for i, t in enumerate(tgt.tolist())]
nll_got = [-float(got[i, t]) for i, t in enumerate(tgt.tolist())]
same = [float(a == b) for a, b in zip(ref.argmax(-1).tolist(), got.argmax(-1).tolist())]
print(json.dumps({"figures": figures, "kld": kld, "nll_ref": nll_ref, "nll_got": nll_got, "same": same}))
"""


@pytest.mark.slow
def test_torch_errors_are_the_statistics_of_the_scored_tokens(trained_model: Path, convert_python: Path,
                                                                corpus: Path) -> None:
    """hf_eval.figures on real log-probs (the trained tiny Llama against itself with its weights
    rounded to 4 bits, in torch): each error is the textbook statistic of the per-token values."""
    proc = subprocess.run([str(convert_python), "-c", TORCH_CHILD, str(trained_model), str(corpus)],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO / "wrapper")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    f, kld, nll_ref, nll_got, same = out["figures"], out["kld"], out["nll_ref"], out["nll_got"], out["same"]
    n = len(kld)
    assert n == f["tokens"] == 6 * 63 and SE_KEYS <= set(f)
    root = math.sqrt(n)
    ppl, ppl_base = math.exp(statistics.fmean(nll_got)), math.exp(statistics.fmean(nll_ref))
    # the delta method on the paired difference: PPL - PPL(base) ~ ppl x nll_got - ppl_base x nll_ref
    paired = [ppl * g - ppl_base * r for g, r in zip(nll_got, nll_ref, strict=True)]
    top1 = statistics.fmean(same)
    expected = {"kld_mean_se": statistics.stdev(kld) / root, "ppl_se": ppl * statistics.stdev(nll_got) / root,
                "ppl_base_se": ppl_base * statistics.stdev(nll_ref) / root,
                "delta_ppl_se": statistics.stdev(paired) / root,
                "top1_agreement_se": math.sqrt(top1 * (1 - top1) / (n - 1))}
    assert {k: f[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert f["kld_mean"] > 0 and 0 < f["top1_agreement"] < 1 and f["delta_ppl"] > 0
    # the measured spread the plan assumes (evaltext.KLD_SPREAD): a real model's is about 2-6
    assert 1.0 < f["kld_mean_se"] * root / f["kld_mean"] < 8.0


# -- end to end: llama.cpp and transformers, the table, the card, the page ---------------------------


def _measured_run(trained_model: Path, corpus: Path, on: Lane, root: Path) -> Path:
    out = root / "o"
    proc = on.qwrap("run", str(trained_model), "-o", str(out), "-q", "Q4_K_M", "-q", "Q4_K_S", "--no-imatrix",
                    "--eval-text", str(corpus), "--eval-tokens", "2048", "--eval-ctx", "256", "--threads", "1",
                    "--eval-weights", "on")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


prefetch(__name__, "stderr.measured", _measured_run, ("trained_model", "corpus"), fixture="measured_run")


@pytest.fixture(scope="module")
def measured_run(request: pytest.FixtureRequest) -> Path:
    """The trained tiny Llama to Q4_K_M and Q4_K_S (close in quality), measured in llama.cpp
    and in transformers (the weights view) on the same 1,016 tokens. (On the session's lane:
    background.py.)"""
    return prefetched(request, "stderr.measured")


@pytest.mark.slow
def test_a_real_run_carries_every_error(measured_run: Path) -> None:
    result = results.load(measured_run)
    assert len(result.artifacts) == 2
    for a in result.artifacts:
        q = a.quality
        assert q is not None and q.runtime == "llama.cpp" and q.tokens == 8 * 127
        # exactly what llama-perplexity printed in the step's log
        log = measured_run / ".checkpoint" / "logs" / f"gguf.eval-{a.quant}.log"
        printed = printed_errors(log.read_text(encoding="utf-8").splitlines())
        assert set(printed) == SE_KEYS and all(v > 0 for v in printed.values())
        assert {k: q.figures[k] for k in SE_KEYS} == pytest.approx(printed)
        # the same statistics in torch, on the same token ids, for the same file's weights
        w = q.weights
        if w is None:
            _missing("the weights view (the gptqmodel environment)", f"{q.weights_unavailable}")
        assert w is not None and w.runtime == "transformers" and w.tokens == q.tokens
        for key in ("kld_mean_se", "ppl_se", "ppl_base_se", "delta_ppl_se", "top1_agreement_se"):
            assert w.figures[key] == pytest.approx(q.figures[key], rel=0.25), (a.quant, key)
    # every renderer shows them; whether the two are within noise is the helper's call, said the same way
    q4m, q4s = (a.quality for a in result.artifacts)
    assert q4m is not None and q4s is not None
    close = within_noise(q4m, q4s)
    console = Console(file=io.StringIO(), width=400, color_system=None)
    report.render_table(result, console)
    table = console.file.getvalue()  # type: ignore[attr-defined]
    card = modelcard.render(result)
    page = qualitypage.render(result, measured_run, None, reference_bytes=None)
    for text in (table, card, page):
        assert figure("kld_mean").text(q4m) in text and figure("top1_agreement").text(q4s) in text
        assert ("Q4_K_M ≈ Q4_K_S" in text or "≈ Q4_K_S" in text) == close
    assert "± its standard error" in card and "± its standard error" in page


@pytest.mark.slow
def test_the_quality_page_draws_error_bars(measured_run: Path) -> None:
    result = results.load(measured_run)
    doc = qualitypage.plot_input(result, None)
    assert [p["kld_mean_se"] for p in doc["points"]] == [a.quality.kld_mean_se for a in result.artifacts if a.quality]
    written = qualitypage.write(measured_run, result, reference_bytes=None)
    if written.note:
        _missing("the report environment", written.note)
    page = (measured_run / "quality.html").read_text()
    assert "one standard error either side" in page and "PPL of the 16-bit model" in page
    assert re.search(r"PPL of the 16-bit model [\d.]+ ± [\d.]+", page)
