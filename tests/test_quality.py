"""Quality figures: every artifact measured against its source on the same tokens, and the
gates that fail a CI run on them."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from background import Lane, prefetch, prefetched
from conftest import REPO, Run, run_qwrap
from qwrap.errors import UsageError
from qwrap.quality import PERPLEXITY_ATTEMPTS, base_chunks, gate, parse_base_ppl, parse_gates, parse_kld_summary
from qwrap.toolchain import Toolchain

RECORDED = REPO / "tests" / "data" / "recorded"


# The slow tests' runs are work on the session's lane (background.py: prefetch), read with
# prefetched: they spend much of their time in one thread (a converter, a worker, a model build).


def test_kld_summary_parsed_from_recorded_output() -> None:
    q = parse_kld_summary((RECORDED / "llama-perplexity-kld.log").read_text().splitlines())
    assert set(q) >= {"ppl", "ppl_base", "delta_ppl", "kld_mean", "kld_p99", "top1_agreement"}
    assert 0 < q["kld_mean"] < q["kld_p99"] and 0 < q["top1_agreement"] <= 1
    assert abs(q["ppl"] - q["ppl_base"] - q["delta_ppl"]) < 1e-3 * q["ppl"]
    assert parse_base_ppl((RECORDED / "llama-perplexity-base.log").read_text().splitlines()) > 1
    with pytest.raises(ValueError, match="kld_mean"):
        parse_kld_summary(["Mean PPL(Q) : 1.0"])


def test_a_base_files_chunks_are_read_from_its_header(tmp_path: Path) -> None:
    """llama-perplexity takes fewer chunks than asked for from a short text: the figures say how
    many it measured, from the base file's header (n_ctx, n_vocab, n_chunk), not the request."""
    base = tmp_path / "base.kld"
    base.write_bytes(b"_logits_" + struct.pack("<iii", 512, 4096, 5) + bytes(4 * 512 * 5))
    assert base_chunks(base) == 5
    base.write_bytes(b"not a base file at all")
    with pytest.raises(ValueError, match="not a llama-perplexity base file"):
        base_chunks(base)


def test_gates() -> None:
    gates = parse_gates(["0.05", "q2_k=0.2", "awq=0.01"])
    row = {"format": "gguf", "quant": "Q2_K", "quality": {"kld_mean": 0.1}}
    assert gate(row, gates) == "passed"  # its own limit, not the default
    assert gate({**row, "quant": "Q4_K_M"}, gates) == "failed"
    assert gate({"format": "awq", "quant": "4bit-g128", "quality": {"kld_mean": 0.02}}, gates) == "failed"
    assert gate({"format": "gguf", "quant": "Q8_0", "quality": None}, gates) == "failed"  # unmeasured never passes
    assert gate(row, parse_gates([])) is None
    with pytest.raises(UsageError):
        parse_gates(["Q2_K=much"])


def _perplexity(toolchain: Toolchain, *args: str, done: str) -> list[str]:
    """Run llama-perplexity by hand; like qwrap, run it again when it ended without printing
    ``done`` (the pinned build sometimes loses its last lines at exit)."""
    for _ in range(PERPLEXITY_ATTEMPTS):
        proc = subprocess.run([str(toolchain.bin_dir / "llama-perplexity"), *args], capture_output=True, text=True,
                              check=True, stdin=subprocess.DEVNULL)
        lines = proc.stdout.splitlines() + proc.stderr.splitlines()
        if any(done in line for line in lines):
            return lines
    raise AssertionError(f"llama-perplexity never printed {done!r}")


@dataclass(frozen=True)
class HandChecked:
    out: Path
    plan: subprocess.CompletedProcess[str]  # `qwrap plan --json`
    run: subprocess.CompletedProcess[str]  # the run's --json
    hand: dict[str, dict[str, float]]  # by quant: llama-perplexity run by hand on the artifact
    gated: subprocess.CompletedProcess[str]  # the same run again with --max-kld Q2_K=0


# one thread, in qwrap and by hand: llama.cpp's threads spin-wait for each other, slow beside
# the other lanes' work
HAND_OPTIONS = ("-q", "Q8_0", "-q", "Q2_K", "--eval-tokens", "2048", "--eval-ctx", "256", "--threads", "1",
                "--keep-intermediate", "--eval-weights", "on")


def _hand_checked(tiny_model: Path, corpus: Path, toolchain: Toolchain, on: Lane, root: Path) -> HandChecked:
    """The tiny model to Q8_0 and Q2_K measured on the corpus, then llama-perplexity run by hand
    on the same 16-bit file, text and chunking, then the run again with a gate (on the
    session's lane: background.py)."""
    out, options = root / "o", [*HAND_OPTIONS, "--eval-text", str(corpus)]
    plan = on.qwrap("plan", str(tiny_model), "-o", str(out), *options, "--json")
    run = on.qwrap("run", str(tiny_model), "-o", str(out), *options, "--json")
    hand: dict[str, dict[str, float]] = {}
    if run.returncode == 0:
        # the base once, then each artifact against it
        base = root / "hand.kld"
        sixteen = next((out / ".checkpoint" / "work").glob("*-BF16.gguf"))
        common = ["-c", "256", "--chunks", "8", "-t", "1", "-b", "256"]
        _perplexity(toolchain, "-m", str(sixteen), "-f", str(corpus), *common, "--kl-divergence-base", str(base),
                    done="Final estimate")
        for art in json.loads(run.stdout)["artifacts"]:
            hand[art["quant"]] = parse_kld_summary(_perplexity(
                toolchain, "-m", art["path"], *common, "--kl-divergence-base", str(base), "--kl-divergence",
                done="Same top p:"))
    gated = on.qwrap("run", str(tiny_model), "-o", str(out), *options, "--max-kld", "Q2_K=0", "--json")
    return HandChecked(out, plan, run, hand, gated)


prefetch(__name__, "quality.hand", _hand_checked, ("tiny_model", "corpus", "toolchain"),
         tests=("test_gguf_figures_equal_hand_run_llama_perplexity",))


@pytest.mark.slow
def test_gguf_figures_equal_hand_run_llama_perplexity(request: pytest.FixtureRequest) -> None:
    checked: HandChecked = prefetched(request, "quality.hand")
    out = checked.out
    assert checked.plan.returncode == 0, checked.plan.stderr
    steps = {s["id"]: s for s in json.loads(checked.plan.stdout)["steps"]}
    assert steps["gguf.eval-base"]["params"]["chunks"] == 8 and steps["gguf.eval-base"]["estimates"]["output_bytes"] > 0
    assert steps["gguf.eval:Q2_K"]["inputs"] == {"artifact": "gguf.validate:Q2_K", "base": "gguf.eval-base"}
    proc = checked.run
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["schema"] == "qwrap.result/2"
    ref = result["quality_reference"]
    assert ref["ctx"] == 256 and ref["chunks"] == 8 and ref["tokens_scored"] == 8 * 127
    by_quant = {a["quant"]: a for a in result["artifacts"]}
    assert set(checked.hand) == set(by_quant) == {"Q8_0", "Q2_K"}
    for quant, art in by_quant.items():
        q = art["quality"]
        assert q["runtime"] == "llama.cpp" and q["tokens"] == 8 * 127 and q["ctx"] == 256
        # the weights view: the same artifact dequantized into transformers, the same token ids
        w = q["weights"]
        assert w["runtime"] == "transformers" and w["tokens"] == q["tokens"] and w["kld_mean"] > 0, w
        # the same figures as llama-perplexity run by hand on the same files, text and chunking
        hand = checked.hand[quant]
        for key in ("kld_mean", "kld_p99", "ppl", "ppl_base", "top1_agreement"):
            assert abs(q[key] - hand[key]) <= 0.01 * abs(hand[key]) + 1e-6, (quant, key, q[key], hand[key])
    assert by_quant["Q2_K"]["quality"]["kld_mean"] > by_quant["Q8_0"]["quality"]["kld_mean"]
    assert by_quant["Q2_K"]["quality"]["weights"]["kld_mean"] > by_quant["Q8_0"]["quality"]["weights"]["kld_mean"]
    bridge = ref["bridge"]  # the 16-bit GGUF in llama.cpp against the source in transformers
    assert abs(bridge["relative_difference"]) < 0.02, bridge
    card = (out / "README.md").read_text()
    assert "KLD (mean)" in card and "scored tokens" in card
    # a gate over the limit fails the run with its own code, after everything is built and measured
    gated = checked.gated
    assert gated.returncode == 17, gated.stderr
    rows = {a["quant"]: a for a in json.loads(gated.stdout)["artifacts"]}
    assert rows["Q2_K"]["gate"] == "failed" and rows["Q8_0"]["gate"] is None
    assert Path(rows["Q2_K"]["path"]).is_file() and "--max-kld" in gated.stderr


def test_default_evaluation_size_keeps_its_share_of_the_run() -> None:
    from qwrap import evaltext

    # the most chunks within a quarter of the run: (0.25 / 0.75 * 300 - 10) / 2 = 45
    assert evaltext.default_chunks(300.0, 10.0, 2.0, 256) == 45
    assert evaltext.default_chunks(20.0, 10.0, 2.0, 512) == evaltext.MIN_CHUNKS  # never under the minimum
    assert evaltext.default_chunks(1e6, 0.0, 0.01, 512) == 16384 // 512  # nor over 16k tokens
    assert evaltext.default_chunks(100.0, 0.0, 0.0, 256) == 64  # free evaluation: the cap
    assert evaltext.chunks_for(256, 4096) == 16 and evaltext.chunks_for(512, 100) == evaltext.MIN_CHUNKS


@pytest.mark.slow
def test_plan_sizes_the_evaluation_and_says_what_it_costs(tiny_model: Path, tmp_path: Path, corpus: Path) -> None:
    def plan(*args: str) -> dict:
        proc = run_qwrap("plan", str(tiny_model), "-o", str(tmp_path / "o"), "-q", "Q4_K_M", "-q", "Q8_0",
                         "--eval-text", str(corpus), *args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    default = plan()
    steps = {s["id"]: s for s in default["steps"]}
    chunks = steps["gguf.eval-base"]["params"]["chunks"]
    evaluation = [s for s in default["steps"] if s["kind"].startswith("gguf.eval")]
    eval_s = sum(s["estimates"]["seconds"] for s in evaluation)
    build_s = sum(s["estimates"]["seconds"] or 0 for s in default["steps"]) - eval_s
    # within its share of the run, or at its minimum when even that is over it
    assert eval_s <= 0.25 * (eval_s + build_s) + 1e-6 or chunks == 2, (chunks, eval_s, build_s)
    (check,) = [c for c in default["checks"] if c["name"] == "evaluation text"]
    assert f"{chunks} chunks of 512 tokens" in check["detail"] and "of the run's estimated" in check["detail"]
    assert not [s for s in default["steps"] if s["kind"] == "gguf.weights"]  # on a CPU only when asked
    asked = plan("--eval-tokens", "4096", "--eval-ctx", "256", "--eval-weights", "on")
    steps = {s["id"]: s for s in asked["steps"]}
    assert steps["gguf.eval-base"]["params"]["chunks"] == 16 and steps["gguf.eval:Q8_0"]["params"]["chunks"] == 16
    assert steps["gguf.weights:Q8_0"]["estimates"]["seconds"] > 0


@pytest.mark.slow
def test_no_eval_and_no_text(tiny_model: Path, tmp_path: Path, gguf_run: Run) -> None:
    plan = json.loads(run_qwrap("plan", str(tiny_model), "-o", str(tmp_path / "o"), "--no-eval", "--json").stdout)
    assert not [s for s in plan["steps"] if "eval" in s["kind"]]
    # offline with no evaluation text at all (conftest's gguf_run): the run goes on, says so, and measures nothing
    assert "not measured" in gguf_run.stderr and "--eval-text" in gguf_run.stderr
    assert [a["quality"] for a in gguf_run.result["artifacts"]] == [None, None]
    assert not [s for s in gguf_run.result["steps"] if "eval" in s["id"]]


def _gptq_and_gguf(tiny_model: Path, corpus: Path, _: Toolchain, on: Lane,
                   tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """GPTQ and GGUF Q4_K_M measured on the same chunks (no importance matrix: the token ids
    are what the test reads; one thread a tool beside the other lanes' work)."""
    out = tmp_path / "o"
    return on.qwrap("run", str(tiny_model), "-o", str(out), "-f", "gptq", "-f", "gguf", "-q", "Q4_K_M",
                    "--calib", str(corpus), "--calib-samples", "4", "--calib-seq-len", "64", "--no-imatrix", "--threads", "1",
                    "--eval-text", str(corpus), "--eval-tokens", "1024", "--eval-ctx", "256", "--keep-intermediate",
                    "--json"), out


prefetch(__name__, "quality.token-ids", _gptq_and_gguf, ("tiny_model", "corpus", "toolchain"),
         tests=("test_awq_gptq_scored_on_the_gguf_token_ids",))


@pytest.mark.backend
def test_awq_gptq_scored_on_the_gguf_token_ids(tiny_model: Path, request: pytest.FixtureRequest) -> None:
    """GPTQ in transformers scores exactly the token ids llama.cpp scores for the GGUF rows, and
    the bridge row says how far the two runtimes' references differ."""
    import hashlib
    import struct

    proc, out = prefetched(request, "quality.token-ids")  # GPTQ and GGUF Q4_K_M, measured on 4 chunks of 256 tokens
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {a["format"]: a for a in result["artifacts"]}
    gguf, gptq = rows["gguf"]["quality"], rows["gptq"]["quality"]
    assert gptq["runtime"] == "transformers" and gguf["runtime"] == "llama.cpp"
    assert gptq["tokens"] == gguf["tokens"] == 4 * 127 and gptq["ctx"] == 256
    assert 0 <= gptq["kld_mean"] < gptq["kld_p99"] and 0 < gptq["top1_agreement"] <= 1
    # the ids: llama-perplexity's base file holds them; the worker hashed the chunks it scored
    raw = (out / ".checkpoint" / "work" / "eval-base.kld").read_bytes()
    n_ctx, _, n_chunk = struct.unpack("<iii", raw[8:20])
    ids = list(struct.unpack(f"<{n_ctx * n_chunk}i", raw[20:20 + 4 * n_ctx * n_chunk]))
    bos = json.loads((tiny_model / "config.json").read_text())["bos_token_id"]
    chunks = [[bos, *ids[i * n_ctx + 1:(i + 1) * n_ctx]] for i in range(n_chunk)]
    flat = [t for c in chunks for t in c]
    assert gptq["ids_sha256"] == hashlib.sha256(struct.pack(f"<{len(flat)}i", *flat)).hexdigest()
    bridge = result["quality_reference"]["bridge"]
    assert abs(bridge["relative_difference"]) < 0.02, bridge  # bf16 GGUF in llama.cpp vs the source in torch


@pytest.mark.slow
def test_importance_matrix_by_default_for_low_bit_types(tiny_model: Path, tmp_path: Path, corpus: Path,
                                                        gguf_run: Run) -> None:
    def plan(*args: str) -> dict:
        proc = run_qwrap("plan", str(tiny_model), "-o", str(tmp_path / "o"), "-q", "Q4_K_M", "-q", "Q6_K", *args,
                         "--json")
        assert proc.returncode == 0, proc.stderr
        return {s["id"]: s for s in json.loads(proc.stdout)["steps"]}

    steps = plan("--calib", str(corpus))
    assert steps["gguf.quantize:Q4_K_M"]["inputs"].get("imatrix") == "gguf.imatrix"
    assert "imatrix" not in steps["gguf.quantize:Q6_K"]["inputs"]  # only 4 bits and less by default
    assert "gguf.imatrix" not in plan("--calib", str(corpus), "--no-imatrix")
    assert "gguf.imatrix" not in plan()  # offline, no calibration text: none, and it says so
    # gguf_run: Q4_K_M offline without --calib, so without one, and it says so
    assert "without an importance matrix" in gguf_run.stderr, gguf_run.stderr
    assert "gguf.imatrix" not in {s["id"] for s in gguf_run.result["steps"]}
    refused = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "x"), "-q", "IQ2_XS", "--no-imatrix")
    assert refused.returncode == 2 and "--no-imatrix" in refused.stderr


@pytest.mark.slow
def test_qwrap_eval_measures_a_finished_run(tmp_path: Path, corpus: Path, gguf_run: Run) -> None:
    out = tmp_path / "o"
    shutil.copytree(gguf_run.out, out)  # a finished run that measured nothing (no evaluation text)
    assert [a["quality"] for a in gguf_run.result["artifacts"]] == [None, None]
    again = run_qwrap("eval", str(out), "--eval-text", str(corpus), "--eval-tokens", "1024", "--eval-ctx", "256",
                      "--json")
    assert again.returncode == 0, again.stderr
    arts = json.loads(again.stdout)["artifacts"]
    assert len(arts) == 2
    for art in arts:
        assert art["reused"] and art["quality"]["runtime"] == "llama.cpp" and art["quality"]["kld_mean"] > 0
        assert Path(art["path"]).parent == out
    assert {a["quant"]: a["sha256"] for a in arts} == gguf_run.shas()


LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def held_out_split(corpus: Path, folder: Path) -> tuple[Path, Path]:
    """The corpus cut at the blank lines around its last 5% (about where make-tiny-model's
    training holds out its last 5% of tokens, at ~4 characters a token): calibration text the
    model trained on, and evaluation text it never saw and calibration never reads."""
    text = corpus.read_text(encoding="utf-8")
    cut = len(text) * 95 // 100
    calib, held_out = folder / "calibration.txt", folder / "held-out.txt"
    calib.write_text(text[:text.rfind("\n\n", 0, cut)].strip() + "\n", encoding="utf-8")
    held_out.write_text(text[text.find("\n\n", cut):].strip() + "\n", encoding="utf-8")
    return calib, held_out


def test_the_held_out_split_shares_no_document(corpus: Path, tmp_path: Path) -> None:
    from qwrap.evaltext import overlap
    from qwrap.workers.calib import read_documents

    calib, held_out = held_out_split(corpus, tmp_path)
    docs, before, after = read_documents(corpus), read_documents(calib), read_documents(held_out)
    # whole documents: those before the cut, those after it; the one it falls in is in neither
    assert docs[:len(before)] == before and docs[-len(after):] == after and len(before) + len(after) == len(docs) - 1
    assert 10_000 < len(held_out.read_text()) and overlap(held_out, calib) == 0


def _demo_builds(convert_python: Path, on: Lane, tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    """make-tiny-model --cached, one after the other: --texts, --texts again, --texts --seed 1."""

    def build(*args: str) -> subprocess.CompletedProcess[str]:
        proc = on.run([str(convert_python), str(REPO / "scripts" / "make-tiny-model"), "--cached",
                       str(tmp_path / "models"), *args], timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc

    return [build("--texts"), build("--texts"), build("--texts", "--seed", "1")]


prefetch(__name__, "quality.demo", _demo_builds, ("convert_python",),
         tests=("test_the_demo_model_is_built_once_with_separate_texts",))


@pytest.mark.slow
def test_the_demo_model_is_built_once_with_separate_texts(corpus: Path, request: pytest.FixtureRequest) -> None:
    """make-tiny-model --cached (the demo's model) builds once per set of arguments; --texts
    gives a calibration text and an evaluation text that share no document."""
    from qwrap.workers.calib import read_documents

    first, again, other = prefetched(request, "quality.demo")
    model = Path(first.stdout.strip())
    assert "building" in first.stderr and "building" not in again.stderr and again.stdout == first.stdout
    assert model.name == "tiny-llama" and Path(other.stdout.strip()) != model  # keyed by the arguments
    train, held_out = read_documents(model / "texts" / "train.txt"), read_documents(model / "texts" / "held-out.txt")
    docs = read_documents(corpus)
    assert docs[:len(train)] == train and docs[-len(held_out):] == held_out and not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(docs) - 1  # the document the held-out tail begins in: neither


def _ladder_runs(trained_model: Path, corpus: Path, _: Toolchain, on: Lane,
                 tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The trained model to every LADDER type without an importance matrix, then to Q4_K_M with
    the default one from the calibration part of the corpus; both measured on its held-out tail."""
    calib, held_out = held_out_split(corpus, tmp_path)
    common = ["--eval-text", str(held_out), "--eval-tokens", "2048", "--eval-ctx", "256", "--threads", "1", "--json"]
    plain = on.qwrap("run", str(trained_model), "-o", str(tmp_path / "plain"),
                     *[a for q in LADDER for a in ("-q", q)], "--no-imatrix", *common)
    tuned = on.qwrap("run", str(trained_model), "-o", str(tmp_path / "tuned"), "-q", "Q4_K_M",
                     "--calib", str(calib), *common)
    return plain, tuned


prefetch(__name__, "quality.ladder", _ladder_runs, ("trained_model", "corpus", "toolchain"),
         tests=("test_the_ladder_is_sane_and_the_imatrix_helps",))


@pytest.mark.slow
def test_the_ladder_is_sane_and_the_imatrix_helps(request: pytest.FixtureRequest) -> None:
    """On a trained model, KLD rises monotonically from Q8_0 to Q2_K; the default importance
    matrix (from --calib) lowers the KLD of a low-bit type. Measured on the corpus' held-out
    tail, which neither training nor calibration read. (On the session's lane: background.py.)"""
    plain, tuned = prefetched(request, "quality.ladder")
    assert plain.returncode == 0, plain.stderr
    rows = json.loads(plain.stdout)["artifacts"]
    kld = {a["quant"]: a["quality"]["kld_mean"] for a in rows}
    assert all("--eval-weights on" in a["quality"]["weights"]["unavailable"] for a in rows)  # CPU: not by default
    assert [kld[q] for q in LADDER] == sorted(kld[q] for q in LADDER), kld
    assert len(set(kld.values())) == len(LADDER), kld
    assert tuned.returncode == 0, tuned.stderr
    assert "also calibration text" not in tuned.stderr
    (art,) = json.loads(tuned.stdout)["artifacts"]
    assert art["quality"]["kld_mean"] < kld["Q4_K_M"], (art["quality"], kld["Q4_K_M"])  # measured: -9%


def _sparse_llama(folder: Path, tokenizer_from: Path, layers: int, hidden: int, ffn: int) -> None:
    """A Llama-shaped folder of any size for `plan`, which reads headers only: the safetensors
    file is as long as its header says, but sparse (no weights written)."""
    import shutil
    import struct

    folder.mkdir()
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    config = json.loads((tokenizer_from / "config.json").read_text())
    kv = hidden // 8
    config.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=64,
                  num_key_value_heads=8, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": [config["vocab_size"], hidden], "model.norm.weight": [hidden],
              "lm_head.weight": [config["vocab_size"], hidden]}
    for i in range(layers):
        for name, shape in (("self_attn.q_proj", [hidden, hidden]), ("self_attn.k_proj", [kv, hidden]),
                            ("self_attn.v_proj", [kv, hidden]), ("self_attn.o_proj", [hidden, hidden]),
                            ("mlp.gate_proj", [ffn, hidden]), ("mlp.up_proj", [ffn, hidden]),
                            ("mlp.down_proj", [hidden, ffn]), ("input_layernorm", [hidden]),
                            ("post_attention_layernorm", [hidden])):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def _plan_70b(tiny_model: Path, corpus: Path, on: Lane, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    big = tmp_path / "llama-70b"
    _sparse_llama(big, tiny_model, layers=80, hidden=8192, ffn=28672)
    return on.qwrap("plan", str(big), "-o", str(tmp_path / "o"), "-q", "Q4_K_M", "--eval-text", str(corpus), "--json")


prefetch(__name__, "quality.70b", _plan_70b, ("tiny_model", "corpus"),
         tests=("test_a_70b_model_on_a_cpu_is_told_what_the_evaluation_costs",))


@pytest.mark.slow
def test_a_70b_model_on_a_cpu_is_told_what_the_evaluation_costs(request: pytest.FixtureRequest) -> None:
    """Even at its minimum, evaluating a 70B model on a CPU takes hours: `plan` says so."""
    proc = prefetched(request, "quality.70b")  # `qwrap plan` of a sparse Llama of 70B's shape, with the tiny tokenizer
    plan = json.loads(proc.stdout)
    assert plan["parameters"] > 60e9, plan["parameters"]
    assert {s["id"]: s for s in plan["steps"]}["gguf.eval-base"]["params"]["chunks"] == 2
    (check,) = [c for c in plan["checks"] if c["name"] == "evaluation time"]
    assert "of the run's estimated" in check["detail"] and "--no-eval" in check["detail"], check
