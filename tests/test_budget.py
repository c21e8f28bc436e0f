"""Size budgets end to end, with the real pinned llama.cpp: on the trained tiny Llama and on a
tiny Mixtral (mixture of experts), a budget is met, the file that ships is not worse than the
stock type nearest its size beyond the noise, the searched recipe lands in the GGUF's tensor
types, the sensitivity and the importance matrix are reused across budgets, reruns and output
folders (and the run says so), and bad budgets are refused before any work."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from background import Lane, prefetch, prefetched
from conftest import calibration_sample, qwrap_argv, run_qwrap
from moments import wait_for
from qwrap.evaltext import kld_standard_error
from qwrap.formats.gguf.recipes import parse
from qwrap.ggufinfo import read_info
from qwrap.toolchain import Toolchain, cache_root
from test_quality import held_out_split

pytestmark = pytest.mark.slow
EVAL = ["--eval-tokens", "2048", "--eval-ctx", "256"]
# The runs on the session's lane run their tools on one thread: llama.cpp's threads spin-wait for
# each other, and beside the other lanes' work two of them make the sensitivity's hundreds of
# passes several times slower than one.
ONE_THREAD = ["--threads", "1"]


def journal(out: Path) -> dict[str, dict[str, Any]]:
    """Each step's last record in the run's journal."""
    found: dict[str, dict[str, Any]] = {}
    for line in (out / ".checkpoint" / "journal.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            found[record["step"]] = record
    return found


def budget_texts(corpus: Path, folder: Path) -> tuple[Path, Path]:
    """The corpus' held-out split, its calibration part cut to its first ~12k tokens: the
    sensitivity measures 16 chunks of 512 tokens of it (as of the whole part), the importance
    matrix reads all of it (23 chunks, not 120: seconds less of both cores)."""
    calib, held_out = held_out_split(corpus, folder)
    return calibration_sample(calib, calib, 48_000), held_out


def checked(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _budget_run(trained_model: Path, corpus: Path, _: Toolchain, on: Lane,
                root: Path) -> tuple[Path, subprocess.CompletedProcess[str], list[str], Path, dict[str, Any]]:
    """Two budgets in one run, beside a stock Q4_K_M: one sensitivity pass for both (on the
    session's lane, background.py). The first attempt is SIGKILLed once the sensitivity has
    recorded a probe; the rerun finishes it. Its texts are every run's of this module (an
    importance matrix records its calibration file's name), its kept statistics those the
    reruns reuse."""
    (root / "texts").mkdir(parents=True, exist_ok=True)
    calib, held_out = budget_texts(corpus, root / "texts")
    texts = ["--calib", str(calib), "--eval-text", str(held_out), *EVAL]
    stats, out = root / "stats", root / "out"
    args = ["run", str(trained_model), "-o", str(out), "-q", "Q4_K_M", "--target-bpw", "5", "--target-size", "2.2M",
            "--keep-intermediate", "--json", *ONE_THREAD, *texts]
    env = {**on.env, "QWRAP_STATS_DIR": str(stats)}
    first = subprocess.Popen(qwrap_argv(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, env=env)
    try:
        wait_for(out, "file:.checkpoint/work/sensitivity-*/probes.json", first)
    finally:
        first.kill()
        _, err = first.communicate()
    probes = next((out / ".checkpoint" / "work").glob("sensitivity-*/probes.json"))
    killed = {"returncode": first.returncode, "stderr": err, "probes": json.loads(probes.read_text())}
    proc = on.qwrap(*args, env={"QWRAP_STATS_DIR": str(stats)})
    return out, proc, texts, stats, killed


prefetch(__name__, "budget.run", _budget_run, ("trained_model", "corpus", "toolchain"), fixture="budget_run")


@pytest.fixture(scope="module")
def budget_run(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any], subprocess.CompletedProcess[str]]:
    out, proc, _, _, _ = prefetched(request, "budget.run")
    return out, checked(proc), proc


@pytest.fixture(scope="module")
def texts(request: pytest.FixtureRequest, budget_run: Any) -> list[str]:
    return list(prefetched(request, "budget.run")[2])


@pytest.fixture(scope="module")
def stats(request: pytest.FixtureRequest, budget_run: Any) -> Path:
    """The calibration statistics kept between this module's runs (as the cache keeps them)."""
    return Path(prefetched(request, "budget.run")[3])


def budgets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["quant"]: a for a in result["artifacts"] if a["budget"] is not None}


def test_budgets_are_met_and_never_worse_than_stock(budget_run: tuple[Path, dict[str, Any], Any]) -> None:
    out, result, _ = budget_run
    rows = budgets(result)
    assert set(rows) == {"bpw-5", "size-2.2M"}
    params = read_info(next(out.glob("*-Q4_K_M.gguf"))).parameter_count
    limits = {"bpw-5": int(5 * params / 8), "size-2.2M": 2_200_000}
    for label, a in rows.items():
        b = a["budget"]
        path = Path(a["path"])
        assert path.is_file() and path.stat().st_size == a["bytes"] <= limits[label] == b["budget_bytes"]
        assert a["validated"] and a["quality"]["kld_mean"] is not None and a["quality"]["kld_mean_se"] > 0
        stock, searched = b["stock"], b["searched"]
        assert stock["bytes"] <= limits[label] and searched["bytes"] <= limits[label]
        # the stock type compared is the largest stock mix within the budget
        assert stock["quant"] in ("Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_XS", "Q3_K_M")
        shipped = searched if b["chosen"] == "searched" else stock
        assert a["bytes"] == shipped["bytes"] and a["quality"]["kld_mean"] == shipped["quality"]["kld_mean"]
        # never worse than stock beyond the noise of the two measurements
        noise = 2 * math.hypot(searched["quality"]["kld_mean_se"], stock["quality"]["kld_mean_se"])
        assert a["quality"]["kld_mean"] <= stock["quality"]["kld_mean"] + noise, b
        if b["chosen"] == "searched":  # it ships only when better beyond the noise
            assert searched["quality"]["kld_mean"] < stock["quality"]["kld_mean"] - noise, b
        # the recipe beside it, listed in the result; the terminal table shows the comparison
        recipe = path.with_name(a["recipe"]["file"])
        assert recipe.is_file() and (a["recipe"]["rules"] > 0) == (b["chosen"] == "searched")
    # the stock sizes the search predicts (dry runs, the header's metadata) are the files' exact sizes
    steps = journal(out)
    q4 = next(a for a in result["artifacts"] if a["quant"] == "Q4_K_M")
    for label in rows:
        found, compared = steps[f"gguf.search:{label}"]["info"], steps[f"gguf.compare:{label}"]["info"]
        assert found["stock_sizes"][compared["quant"]] == compared["bytes"]
        assert found["stock_sizes"]["Q4_K_M"] == q4["bytes"]
    card = (out / "README.md").read_text()
    assert "## Size budgets" in card and "--target-bpw 5" in card and "--target-size 2.2M" in card
    page = (out / "quality.html").read_text()
    assert '<table id="budgets">' in page and "searched vs stock" in page


def test_the_searched_recipe_lands_in_the_tensor_types(budget_run: tuple[Path, dict[str, Any], Any]) -> None:
    out, result, _ = budget_run
    for label in budgets(result):
        stem = next(out.glob(f"*-{label}.gguf")).name.removesuffix(".gguf")
        recipe = parse((out / ".checkpoint" / "work" / f"{stem}.recipe").read_text(), "searched")
        info = read_info(out / ".checkpoint" / "work" / f"{stem}.searched.gguf")
        assert info.metadata.get("qwrap.recipe.sha256") == recipe.sha256
        governed = 0
        for t in info.tensors:
            rule = recipe.type_of(t.name)
            if rule is not None:
                governed += 1
                assert t.ggml_type == rule.type.id, (t.name, rule.text)
        assert governed >= 10  # every quantized group has its rule
        # the sensitivity ran once for both budgets, before either search
        steps = journal(out)
        assert steps["gguf.sensitivity"]["state"] == "done"
        assert steps["gguf.sensitivity"]["info"]["probes"] == steps["gguf.sensitivity"]["info"]["groups"] + 7


def test_statistics_are_reused_by_another_budget_in_another_folder(
        budget_run: tuple[Path, dict[str, Any], Any], trained_model: Path, texts: list[str], stats: Path,
        tmp_path: Path) -> None:
    """A rerun with another budget into another folder: the importance matrix and the
    sensitivity come from the cache (and the run says so); a KLD budget is checked on the
    measured figure, without a comparison (--no-compare)."""
    first, _, _ = budget_run
    assert sorted(p.name.split("-")[0] for p in stats.iterdir()) == ["imatrix", "sensitivity"]
    proc = run_qwrap("run", str(trained_model), "-o", str(tmp_path / "again"), "--target-kld", "0.01",
                     "--no-compare", "--keep-intermediate", "--json", *texts,
                     env={"QWRAP_STATS_DIR": str(stats)})
    assert proc.returncode in (0, 17), proc.stderr[-3000:]
    assert "importance matrix reused from the cache" in proc.stderr
    assert "sensitivity reused from the cache" in proc.stderr
    steps = journal(tmp_path / "again")
    assert steps["gguf.sensitivity"]["info"]["reused_from_cache"] is True
    assert steps["gguf.imatrix"]["info"]["reused_from_cache"] is True
    assert "gguf.compare:kld-0.01" not in steps
    # the same statistics, byte for byte
    for name in ("imatrix.gguf", "sensitivity.json"):
        assert (tmp_path / "again" / ".checkpoint" / "work" / name).read_bytes() == \
            (first / ".checkpoint" / "work" / name).read_bytes()
    result = json.loads(proc.stdout)
    (a,) = result["artifacts"]
    assert a["budget"]["kld_limit"] == 0.01 and a["budget"]["stock"] is None
    within = a["quality"]["kld_mean"] <= 0.01
    assert a["gate"] == ("passed" if within else "failed") and proc.returncode == (0 if within else 17)


def test_a_sensitivity_killed_between_probes_resumes_at_the_next_probe(
        request: pytest.FixtureRequest, budget_run: tuple[Path, dict[str, Any], Any]) -> None:
    """The module's run was SIGKILLed once the sensitivity had recorded its first probes; the
    rerun measured only the probes left (the same llama-perplexity on the same tokens gives the
    same figures, so the result is the uninterrupted one's)."""
    out, result, _ = budget_run
    killed = prefetched(request, "budget.run")[4]
    assert killed["returncode"] == -signal.SIGKILL, f"the run ended by itself: {killed['stderr'][-2000:]}"
    done_before = killed["probes"]
    total = journal(out)["gguf.sensitivity"]["info"]["probes"]
    assert 1 <= len(done_before) < total
    # the step's log (both runs, appended): each probe quantized once, but the one the kill cut short
    log = (out / ".checkpoint" / "logs" / "gguf.sensitivity.log").read_text()
    assert "calculating perplexity over 16 chunks" in log  # the calibration text (budget_texts) holds them all
    quantized = log.count("llama-quantize --pure --imatrix")
    assert total <= quantized <= total + 1, (quantized, total)
    # the rerun (its part of the log begins with its own dry run) measured only the probes left,
    # against the 16-bit figures the killed run wrote (not measured again)
    dry_runs = [n for n, line in enumerate(log.splitlines()) if "llama-quantize --dry-run" in line]
    assert len(dry_runs) == 2, dry_runs
    rerun = "\n".join(log.splitlines()[dry_runs[1]:])
    assert rerun.count("llama-quantize --pure --imatrix") == total - len(done_before), (total, done_before)
    assert not [line for line in rerun.splitlines() if line.startswith("$ ") and "llama-perplexity" in line
                and " -f " in line]
    assert not list(out.glob("*.partial")) and all(a["validated"] for a in result["artifacts"])


@pytest.mark.parametrize(("args", "words"), [
    (["--target-size", "100K"], "the smallest file a search can make of this model is about"),
    (["--target-bpw", "40"], "--target-bpw '40' is not a number between 1.5 and 16"),
    (["--target-size", "3 apples"], "--target-size '3 apples' is not a size"),
    (["--target-bpw", "5", "--no-eval"], "a --target-* budget needs calibration text"),
    (["--target-bpw", "5", "--no-imatrix"], "--no-imatrix"),
])
def test_bad_budgets_are_refused_before_any_work(trained_model: Path, corpus: Path, tmp_path: Path,
                                                 toolchain: Toolchain, args: list[str], words: str) -> None:
    for command in ("plan", "run"):
        out = tmp_path / command
        proc = run_qwrap(command, str(trained_model), "-o", str(out), "--calib", str(corpus), *args)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr
        assert not (out / ".checkpoint" / "journal.jsonl").exists() or "gguf.convert" not in \
            (out / ".checkpoint" / "journal.jsonl").read_text()



def test_plan_states_the_precision_of_the_measured_kld_at_each_kld_budget(trained_model: Path, corpus: Path,
                                                                          tmp_path: Path, toolchain: Toolchain) -> None:
    """A --target-kld is held against the evaluation's measured KLD: plan says how precise that
    figure will be at each limit, from the tokens the evaluation scores."""
    proc = run_qwrap("plan", str(trained_model), "-o", str(tmp_path / "o"), "--calib", str(corpus), "--json",
                     "--target-kld", "0.002", "--target-kld", "0.02", "--eval-tokens", "4096")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    (check,) = [c for c in plan["checks"] if c["name"] == "budget precision"]
    scored = plan["evaluation"]["tokens_scored"]
    assert scored == 8 * (512 - 1 - 256)  # --eval-tokens 4096: 8 chunks of 512, the second halves scored
    for kld in (0.002, 0.02):
        assert f"± {kld_standard_error(kld, scored):.2g} at {kld:g}" in check["detail"], check
    assert f"{scored:,} evaluation tokens" in check["detail"]
    without = run_qwrap("plan", str(trained_model), "-o", str(tmp_path / "o"), "--calib", str(corpus), "--json",
                        "--target-bpw", "5")
    assert without.returncode == 0 and "budget precision" not in without.stdout

# -- a mixture of experts --------------------------------------------------------------------------

BUILD_MIXTRAL = r"""
import shutil, sys
from pathlib import Path
import torch
from transformers import MixtralConfig, MixtralForCausalLM
tokenizer, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = MixtralConfig(vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.05)
model = MixtralForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (tokenizer / name).exists():
        shutil.copy(tokenizer / name, out / name)
"""


def tiny_moe(tiny_model: Path, convert_python: Path) -> Path:
    """A 2-layer Mixtral (4 experts of width 256, 2 active: every expert tensor a whole number of
    256-weight blocks, as small as that allows), random weights from a fixed seed, with the
    tiny Llama's tokenizer; built once per machine."""
    from conftest import built_by_script

    key = hashlib.sha256(BUILD_MIXTRAL.encode() + (tiny_model / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return built_by_script(convert_python, cache_root() / "test-models" / f"moe-{key}" / "tiny-mixtral", BUILD_MIXTRAL,
                           tiny_model)


def _moe_run(tiny_model: Path, convert_python: Path, corpus: Path, _: Toolchain, on: Lane,
             root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The tiny Mixtral to a 5-bit budget (on the session's lane, background.py), its
    sensitivity measured on a short calibration text (~3k tokens: fewer chunks than the 16 asked
    for, each of its 23 probes a few times cheaper)."""
    calib, held_out = held_out_split(corpus, root)
    calibration_sample(calib, calib, 12_000)
    out = root / "moe"
    # a minimum no expert can reach: the coverage warns and the run goes on (test_arch_coverage.py
    # reads the counts, the warning and the card of this run)
    proc = on.qwrap("run", str(tiny_moe(tiny_model, convert_python)), "-o", str(out), "--target-bpw", "5",
                    "--keep-intermediate", "--json", *ONE_THREAD, "--calib", str(calib), "--eval-text", str(held_out),
                    *EVAL, "--min-expert-tokens", "100000")
    return out, proc


# last on the session's lane: it would wait there behind the module's first run; the test
# does it itself while the lane goes on with the runs of the modules after this one
prefetch(__name__, "budget.moe", _moe_run, ("tiny_model", "convert_python", "corpus", "toolchain"),
         tests=("test_a_budget_on_a_mixture_of_experts",), last=True)


def test_a_budget_on_a_mixture_of_experts(request: pytest.FixtureRequest) -> None:
    """Routed experts, the router and attention are groups of their own; the budget is met and
    the shipped file is not worse than the stock one beyond the noise."""
    out, proc = prefetched(request, "budget.moe")
    result = checked(proc)
    (a,) = result["artifacts"]
    b = a["budget"]
    params = read_info(Path(a["path"])).parameter_count
    assert a["bytes"] <= int(5 * params / 8) and a["validated"]
    noise = 2 * math.hypot(b["searched"]["quality"]["kld_mean_se"], b["stock"]["quality"]["kld_mean_se"])
    assert a["quality"]["kld_mean"] <= b["stock"]["quality"]["kld_mean"] + noise
    work = out / ".checkpoint" / "work"
    sensitivity = json.loads((work / "sensitivity.json").read_text())
    kinds = {g["kind"] for g in sensitivity["groups"]}
    # the chunks the short text holds, not the 16 asked for, and their scored tokens
    assert 2 <= sensitivity["chunks"] < 16, sensitivity["chunks"]
    assert sensitivity["sensitivity"]["tokens"] == sensitivity["chunks"] * (512 - 1 - 256)
    assert {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "attn_q", "attn_v"} <= kinds, kinds
    assert "ffn_gate_inp" not in kinds  # the router stays in float
    searched = parse(next(work.glob("*-bpw-5.recipe")).read_text(), "searched")
    assert {r.pattern.split("\\.")[-2].lstrip("^") for r in searched.rules} == kinds
