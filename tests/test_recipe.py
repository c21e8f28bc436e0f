"""--recipe: per-tensor types on top of a GGUF type. In-process: the parser, the check (naming the
line), which tensors llama-quantize quantizes, the model check's wiring and the plan's steps. With
the real pinned tools (slow): the converter's dry-run listing against the real 16-bit header (and
a sparse MoE model's merged experts), a recipe landing in the artifact's tensor types and beside
it, bad recipes refused before any conversion, and at the quantize step when the model checks are
skipped."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from conftest import built_model, model_key, run_qwrap
from qwrap.errors import UsageError
from qwrap.formats.gguf import modelchecks
from qwrap.formats.gguf.ggmltypes import BY_ID, GGML_TYPES, file_bytes, parse_type
from qwrap.formats.gguf.recipes import (
    check,
    check_quants,
    load,
    n_dims,
    needs_imatrix,
    parse,
    quantizable,
    quantized_tensors,
    recipe_name,
)
from qwrap.ggufinfo import read_info
from qwrap.hub import resolve_model
from qwrap.journal import Journal
from qwrap.model import ModelInfo, model_info
from qwrap.toolchain import Toolchain, cache_root
from test_core_formats import Dims, options, plan_for, write_model

# -- the file ---------------------------------------------------------------------------------

GOOD = """\
# keep the down projections sharp
ffn_down=q8_0

blk\\.1\\.attn_v=Q6_K   # the last layer's values
TOKEN_EMBD=q5_0 ^output\\.=q6_K
"""


def test_parse_keeps_rules_lines_and_text() -> None:
    r = parse(GOOD, "my.recipe")
    assert [(x.pattern, x.type.name, x.line) for x in r.rules] == [
        ("ffn_down", "q8_0", 2), ("blk\\.1\\.attn_v", "q6_K", 4), ("token_embd", "q5_0", 5), ("^output\\.", "q6_K", 5)]
    # what llama-quantize reads: the rules alone, its patterns lower-cased as it applies them
    assert r.rules_text() == "ffn_down=q8_0\nblk\\.1\\.attn_v=q6_K\ntoken_embd=q5_0\n^output\\.=q6_K\n"
    assert r.to_text() == GOOD  # what is written beside the artifact: the file as it was
    # comments and spacing do not change what is quantized; a rule does
    assert parse("ffn_down=q8_0\nblk\\.1\\.attn_v=q6_K token_embd=q5_0\n^output\\.=q6_K").sha256 == r.sha256
    assert parse(GOOD.replace("q5_0", "q4_0")).sha256 != r.sha256
    assert r.type_of("blk.1.attn_v.weight") is r.rules[1] and r.type_of("blk.0.attn_q.weight") is None


@pytest.mark.parametrize(("text", "words"), [
    ("ffn_down=q8_0\n\nffn_up q4_K\n", ["my.recipe line 3", "'ffn_up' is not REGEX=TYPE"]),
    ("# only comments\n\n", ["my.recipe holds no rules"]),
    ("ffn_down=q8_0\nffn_(up=q4_K\n", ["my.recipe line 2", "not a valid regular expression"]),
    ("ffn_down=q9_K\n", ["my.recipe line 1", "unknown tensor type 'q9_K'"]),
    ("ffn_down=tq1_0\n", ["my.recipe line 1", "unknown tensor type"]),  # not for weights of an ordinary model
    ("=q8_0\n", ["my.recipe line 1"]),
])
def test_parse_refuses_naming_the_line(text: str, words: list[str]) -> None:
    with pytest.raises(UsageError) as err:
        parse(text, "my.recipe")
    assert all(w in err.value.message for w in words), err.value.message


def test_load_and_the_name_beside_the_artifact(tmp_path: Path) -> None:
    (tmp_path / "r.recipe").write_text(GOOD)
    assert load(tmp_path / "r.recipe").source == str(tmp_path / "r.recipe")
    with pytest.raises(UsageError, match="cannot read"):
        load(tmp_path / "missing.recipe")
    assert recipe_name("m-Q4_K_M.gguf") == "m-Q4_K_M.recipe"
    assert recipe_name("m-Q4_K_M.gguf.partial") == "m-Q4_K_M.recipe.partial"


# -- which tensors, and the check ---------------------------------------------------------------

# A Llama's GGUF tensors (shapes in GGUF order: the row first) with an FFN width of 320.
LISTING: dict[str, tuple[int, ...]] = {"token_embd.weight": (256, 4096), "output.weight": (256, 4096),
                                       "output_norm.weight": (256,)}
for _i in range(2):
    LISTING |= {f"blk.{_i}.attn_q.weight": (256, 256), f"blk.{_i}.attn_k.weight": (256, 128),
                f"blk.{_i}.attn_v.weight": (256, 128), f"blk.{_i}.attn_output.weight": (256, 256),
                f"blk.{_i}.ffn_gate.weight": (256, 320), f"blk.{_i}.ffn_up.weight": (256, 320),
                f"blk.{_i}.ffn_down.weight": (320, 256), f"blk.{_i}.attn_norm.weight": (256,),
                f"blk.{_i}.ffn_norm.weight": (256,)}
QUANTIZED = quantized_tensors(LISTING.items())


def test_quantizable_follows_the_pinned_rules() -> None:
    assert len(QUANTIZED) == 16 and not any("norm" in n for n in QUANTIZED)
    assert quantizable("blk.0.ffn_down_exps.weight", (320, 256, 8))  # merged experts: 3-D
    assert not quantizable("blk.0.ffn_gate_inp.weight", (256, 8))  # the router stays in float
    assert not quantizable("blk.0.attn_q.bias", (256, 1))
    assert not quantizable("blk.0.attn_q.weight", (256, 1, 1, 1))  # ggml_n_dims: trailing 1s do not count
    assert not quantizable("position_embd.weight", (256, 2048))
    assert not quantizable("blk.0.ssm_conv1d.weight", (4, 512))
    assert not quantizable("v.patch_embd.weight", (14, 14, 3, 1024))
    assert quantizable("blk.0.hc_attn.weight", (256, 256)) and not quantizable("blk.0.hc_attn.weight", (256, 256),
                                                                                 "glm5-next")
    assert n_dims((256, 1, 1, 1)) == 1 and n_dims((256, 4, 1)) == 2 and n_dims(()) == 1


def test_check_accepts_a_recipe_that_fits() -> None:
    check(parse(GOOD, "my.recipe"), QUANTIZED, imatrix=False)
    check(parse("blk\\.0\\.ffn_down=q4_0\nffn_down=q5_0\nffn=iq4_nl\n.*=q8_0"), QUANTIZED, imatrix=False)


@pytest.mark.parametrize(("text", "imatrix", "words"), [
    ("ffn_down=q8_0\nattn_qkv=q8_0\n", True, ["line 2", "'attn_qkv' matches no quantized tensor"]),
    ("norm=q8_0\n", True, ["line 1", "matches no quantized tensor"]),  # norms are never quantized
    ("ffn_down=q4_K\n", True, ["line 1", "q4_K needs rows of a multiple of 256", "blk.0.ffn_down.weight has rows "
                                                                                  "of 320 (and 1 more)"]),
    ("# x\nffn=iq4_xs\n", True, ["line 2", "iq4_xs", "ffn_down"]),  # up/gate take it, down does not
    ("ffn_up=iq2_xxs\n", False, ["line 1", "iq2_xxs needs an importance matrix (blk.0.ffn_up.weight)"]),
    ("ffn_down=q8_0\nblk\\.0\\.ffn_down=q6_K\n", True, ["line 2", "decides no tensor", "earlier rule"]),
])
def test_check_refuses_naming_the_line(text: str, imatrix: bool, words: list[str]) -> None:
    with pytest.raises(UsageError) as err:
        check(parse(text, "my.recipe"), QUANTIZED, imatrix=imatrix)
    assert all(w in err.value.message for w in ["my.recipe", *words]), err.value.message


def test_importance_matrix_rules() -> None:
    check(parse("ffn_up=iq2_xxs\n"), QUANTIZED, imatrix=True)
    # the token embedding and the output never need one (tensor_requires_imatrix)
    check(parse("token_embd=iq2_xxs\n^output=iq1_s\n"), QUANTIZED, imatrix=False)
    assert needs_imatrix("blk.0.ffn_up.weight", GGML_TYPES["iq2_xs"])
    assert not needs_imatrix("blk.0.ffn_up.weight", GGML_TYPES["iq4_xs"])


def test_a_recipe_needs_a_quantized_type() -> None:
    check_quants(["Q4_K_M", "Q8_0"], "--recipe r")
    with pytest.raises(UsageError, match="F16, BF16 keeps every tensor"):
        check_quants(["Q4_K_M", "F16", "BF16"], "--recipe r")


def test_ggml_types_table() -> None:
    assert parse_type("Q4_k") is GGML_TYPES["q4_k"] and BY_ID[12].name == "q4_K"
    assert GGML_TYPES["q4_k"].bpw == 4.5 and GGML_TYPES["q6_k"].bpw == 6.5625 and GGML_TYPES["q8_0"].bpw == 8.5
    assert GGML_TYPES["q4_k"].fits((512, 3)) and not GGML_TYPES["q4_k"].fits((320, 3))
    assert GGML_TYPES["q5_0"].fits((320, 3)) and not GGML_TYPES["q5_0"].fits((300, 3))
    assert GGML_TYPES["q4_k"].exact_bytes((320, 256)) == 320 * 256 * 144 / 256
    assert file_bytes(100, [(GGML_TYPES["q8_0"], (32, 3)), (GGML_TYPES["f32"], (5,))]) == 100 + 128 + 32


# -- the model check, in-process -----------------------------------------------------------------


@pytest.fixture
def llama320(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelInfo:
    """A Llama-shaped folder (headers only) whose converter listing is LISTING."""
    write_model(tmp_path / "m320", Dims(vocab=4096, hidden=256, layers=2, ffn=320))
    monkeypatch.setattr(modelchecks, "gguf_tensors", lambda model: dict(LISTING))
    return model_info(resolve_model(str(tmp_path / "m320")), None)


def _recipe_check(tmp_path: Path, model: ModelInfo, text: str, **values: Any) -> Any:
    path = tmp_path / "my.recipe"
    path.write_text(text)
    return modelchecks._recipe_check(options("gguf", recipe=str(path), **values), model)


def test_model_check_passes_and_refuses_naming_the_line(tmp_path: Path, llama320: ModelInfo) -> None:
    ok = _recipe_check(tmp_path, llama320, GOOD)
    assert ok.ok and ok.name == "recipe" and "16 quantized GGUF tensors" in ok.detail
    bad = _recipe_check(tmp_path, llama320, "# x\nffn_down=q6_K\n")
    assert not bad.ok and isinstance(bad.error, UsageError)
    assert f"{tmp_path / 'my.recipe'} line 2: q6_K needs rows of a multiple of 256" in bad.error.message
    # a type needing an importance matrix: refused where the run cannot have one
    iq = "ffn_up=iq2_xxs\n"
    assert _recipe_check(tmp_path, llama320, iq, quant=["Q4_K_M"]).ok  # by default: from calibration text
    assert not _recipe_check(tmp_path, llama320, iq, quant=["Q4_K_M"], no_imatrix=True).ok
    assert not _recipe_check(tmp_path, llama320, iq, quant=["Q8_0"]).ok  # Q8_0 never takes one
    assert not _recipe_check(tmp_path, llama320, GOOD, quant=["Q4_K_M", "F16"]).ok


def test_model_check_waits_for_the_weights(tmp_path: Path, llama320: ModelInfo) -> None:
    (llama320.source.path / "model.safetensors").unlink()  # a Hub model planned before its download
    found = _recipe_check(tmp_path, llama320, GOOD)
    assert not found.ok and found.error is None and "not checked yet" in found.detail


def test_run_checks_the_recipe_with_the_quick_checks(tmp_path: Path, llama320: ModelInfo,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from qwrap.checks import Check

    monkeypatch.setattr(modelchecks, "_architecture_check", lambda model: Check("architecture", True, "ok"))
    (tmp_path / "my.recipe").write_text("ffn_down=q4_K\n")
    o = options("gguf", recipe=str(tmp_path / "my.recipe"))
    quick = modelchecks.checks(o, llama320, thorough=False)  # what `run` raises the first failure of
    assert [c.name for c in quick] == ["architecture", "recipe"] and quick[1].error is not None
    assert [c.name for c in modelchecks.checks(options("gguf"), llama320, thorough=False)] == ["architecture"]


# -- the plan ------------------------------------------------------------------------------------


def test_steps_write_the_recipe_beside_the_artifact(tmp_path: Path) -> None:
    write_model(tmp_path / "tiny", Dims(vocab=256, hidden=128, layers=2, ffn=256))
    model = model_info(resolve_model(str(tmp_path / "tiny")), None)
    recipe = tmp_path / "my.recipe"
    recipe.write_text(GOOD)

    def steps(**values: Any) -> dict[str, Any]:
        return {s.id: s for s in plan_for(model, gguf={"quant": ["Q4_K_M"], "eval_weights": "off", **values}).steps}

    by = steps(recipe=str(recipe))
    q, v = by["gguf.quantize:Q4_K_M"], by["gguf.validate:Q4_K_M"]
    assert q.outputs == ("tiny-Q4_K_M.gguf.partial", "tiny-Q4_K_M.recipe.partial")
    assert v.outputs == ("tiny-Q4_K_M.gguf", "tiny-Q4_K_M.recipe") and v.deliverable
    assert q.param("recipe_sha256") == load(recipe).sha256 and q.file("recipe") == str(recipe)
    plain = steps()
    assert plain["gguf.quantize:Q4_K_M"].outputs == ("tiny-Q4_K_M.gguf.partial",)
    assert plain["gguf.validate:Q4_K_M"].outputs == ("tiny-Q4_K_M.gguf",)
    recipe.write_text("# a new comment\n" + GOOD)  # a comment: the same step
    assert steps(recipe=str(recipe))["gguf.quantize:Q4_K_M"].fingerprint == q.fingerprint
    recipe.write_text(GOOD.replace("q5_0", "q4_0"))  # a rule: another step
    assert steps(recipe=str(recipe))["gguf.quantize:Q4_K_M"].fingerprint != q.fingerprint
    # the step reads its own file, and refuses rules that are no longer the planned ones
    from qwrap.context import InputOutputs
    from qwrap.formats.gguf.actions import _recipe_of

    with pytest.raises(UsageError, match="changed since this step was planned"):
        _recipe_of(q, {})
    recipe.write_text("# a new comment\n" + GOOD)
    assert _recipe_of(q, {}) == parse("# a new comment\n" + GOOD, str(recipe))
    searched = tmp_path / "searched.recipe"  # a gguf.search step's output, handed as the `recipe` input
    searched.write_text("# searched\nffn_down=q5_0\n")
    found = _recipe_of(plain["gguf.quantize:Q4_K_M"], {"recipe": InputOutputs((searched,))})
    assert found is not None and found.rules_text() == "ffn_down=q5_0\n"
    assert _recipe_of(plain["gguf.quantize:Q4_K_M"], {}) is None


# -- with the real pinned tools -------------------------------------------------------------------

FFN320 = ("--ffn", "320")  # ffn_down rows of 320: not a whole number of 256-weight blocks


def ffn320_model(python: Path) -> Path:
    """The default tiny Llama with an FFN width of 320, built once per machine."""
    return built_model(python, cache_root() / "test-models" / f"random-{model_key(python, FFN320)}" / "ffn320", FFN320)


@pytest.fixture(scope="module")
def ffn320(convert_python: Path) -> Path:
    return ffn320_model(convert_python)


@pytest.fixture(scope="module")
def recipe_run(ffn320: Path, tmp_path_factory: pytest.TempPathFactory, toolchain: Toolchain) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("recipe-run")
    recipe, out = root / "my.recipe", root / "out"
    recipe.write_text(GOOD)
    proc = run_qwrap("run", str(ffn320), "-o", str(out), "-q", "Q4_K_M", "-q", "Q8_0", "--recipe", str(recipe),
                     "--no-eval", "--no-imatrix", "--keep-intermediate", "--json")
    assert proc.returncode == 0, proc.stderr
    return recipe, out, json.loads(proc.stdout)


def _facts(out: Path, step: str) -> dict[str, Any]:
    done = [r for r in Journal(out).records() if r.get("step") == step and r.get("state") == "done"]
    return dict(done[-1]["info"])


@pytest.mark.slow
def test_recipe_lands_in_the_tensor_types_and_beside_the_artifact(recipe_run: tuple[Path, Path, dict[str, Any]]) -> None:
    recipe_path, out, result = recipe_run
    recipe = load(recipe_path)
    assert {a["quant"] for a in result["artifacts"] if a["validated"]} == {"Q4_K_M", "Q8_0"}
    for quant, stock in (("Q4_K_M", None), ("Q8_0", "q8_0")):
        path = out / f"ffn320-{quant}.gguf"
        info = read_info(path)
        types = {t.name: BY_ID[t.ggml_type].name for t in info.tensors}
        for name in QUANTIZED:
            rule = recipe.type_of(name)
            if rule is not None:
                assert types[name] == rule.type.name, (quant, name)
            elif stock:
                assert types[name] == stock, (quant, name)
        assert types["blk.0.ffn_down.weight"] == "q8_0" and types["blk.1.attn_v.weight"] == "q6_K"
        assert types["token_embd.weight"] == "q5_0" and types["output_norm.weight"] == "f32"
        # recorded in the file's metadata, and written beside it in full, comments and all
        assert info.metadata["qwrap.recipe.sha256"] == recipe.sha256
        assert info.metadata["qwrap.recipe.file"] == f"ffn320-{quant}.recipe"
        assert (out / f"ffn320-{quant}.recipe").read_text() == GOOD
        facts = _facts(out, f"gguf.quantize:{quant}")
        assert facts["recipe"] == {"file": f"ffn320-{quant}.recipe", "sha256": recipe.sha256, "rules": 4}
        assert facts["fallbacks"] == [] and facts["fallback_count"] == 0  # the recipe's ffn_down=q8_0 fits
        assert facts["planned_bits_per_weight"] == facts["bits_per_weight"]
        # ggmltypes' sizes are llama-quantize's: the file is its header and each tensor's data, aligned
        assert file_bytes(info.data_offset, [(BY_ID[t.ggml_type], t.shape) for t in info.tensors]) == \
            path.stat().st_size == facts["bytes"]
    assert not list(out.glob("*.partial")) and not list((out / ".checkpoint" / "work").glob("*.rules"))
    validate = [r for r in Journal(out).records() if r.get("step") == "gguf.validate:Q4_K_M"][-1]
    assert [o["path"] for o in validate["outputs"]] == ["ffn320-Q4_K_M.gguf", "ffn320-Q4_K_M.recipe"]


@pytest.mark.slow
def test_the_listing_is_the_converted_header_and_is_cached(recipe_run: tuple[Path, Path, dict[str, Any]], ffn320: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _, out, _ = recipe_run
    model = model_info(resolve_model(str(ffn320)), None)
    listed = modelchecks.gguf_tensors(model)  # cached by the run's own check
    header = read_info(out / ".checkpoint" / "work" / "ffn320-BF16.gguf")
    assert listed == {t.name: t.shape for t in header.tensors}
    assert quantized_tensors(listed.items()) == QUANTIZED

    def no_child(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached listing ran the converter again")

    monkeypatch.setattr(modelchecks, "run_checked", no_child)
    assert modelchecks.gguf_tensors(model) == listed


BAD = {
    "no tensor": ("ffn_down=q8_0\nattn_qkv=q8_0\n", "line 2: 'attn_qkv' matches no quantized tensor"),
    "fallback": ("# x\n\nffn_down=q4_K\n", "line 3: q4_K needs rows of a multiple of 256 weights"),
    "imatrix": ("ffn_up=iq2_xs\n", "line 1: iq2_xs needs an importance matrix"),
    "syntax": ("ffn_down=q8_0\nffn_up q4_K\n", "line 2: 'ffn_up' is not REGEX=TYPE"),
}


@pytest.mark.slow
def test_bad_recipes_are_refused_before_any_conversion(ffn320: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    for what, (text, words) in BAD.items():
        recipe, out = tmp_path / f"{what.replace(' ', '-')}.recipe", tmp_path / f"out-{what.replace(' ', '-')}"
        recipe.write_text(text)
        proc = run_qwrap("run", str(ffn320), "-o", str(out), "-q", "Q4_K_M", "--recipe", str(recipe), "--no-eval",
                         "--no-imatrix")
        assert proc.returncode == UsageError.exit_code, (what, proc.stderr)
        assert f"{recipe} {words}" in " ".join(proc.stderr.split()), (what, proc.stderr)
        assert not out.exists(), what  # nothing converted, nothing written


@pytest.mark.slow
def test_the_quantize_step_refuses_a_bad_recipe_too(ffn320: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    """--no-preflight skips the model checks: the quantize step checks the recipe against the
    real 16-bit file (and llama-quantize's own dry run) before quantizing."""
    recipe, out = tmp_path / "late.recipe", tmp_path / "out"
    recipe.write_text("# x\nffn_down=q6_K\n")
    proc = run_qwrap("run", str(ffn320), "-o", str(out), "-q", "Q4_K_M", "--recipe", str(recipe), "--no-eval",
                     "--no-imatrix", "--no-preflight")
    assert proc.returncode == UsageError.exit_code, proc.stderr
    assert f"{recipe} line 2: q6_K needs rows of a multiple of 256 weights" in " ".join(proc.stderr.split())
    states = Journal(out).states()
    assert states["gguf.convert"].state.value == "done" and states["gguf.quantize:Q4_K_M"].state.value == "failed"
    assert not list(out.glob("ffn320-Q4_K_M*"))


# -- an MoE model: experts merged by the converter --------------------------------------------------


def tiny_mixtral(tokenizer_from: Path) -> Path:
    """A 2-layer Mixtral (4 experts, FFN width 320) as headers and sparse data, with the tokenizer
    of ``tokenizer_from``; built once per machine (a stable folder keeps its listing cached)."""
    key = hashlib.sha256(b"tiny-mixtral-1" + (tokenizer_from / "tokenizer.json").read_bytes()).hexdigest()[:16]
    final = cache_root() / "test-models" / f"sparse-{key}" / "tiny-mixtral"
    if final.is_dir():
        return final
    vocab, hidden, ffn, experts = 4096, 256, 320, 4
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
                                    "lm_head.weight": [vocab, hidden]}
    for i in range(2):
        p = f"model.layers.{i}."
        for proj, rows in (("q", hidden), ("k", 128), ("v", 128), ("o", hidden)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = [rows, hidden]
        shapes[f"{p}block_sparse_moe.gate.weight"] = [experts, hidden]
        for e in range(experts):
            shapes |= {f"{p}block_sparse_moe.experts.{e}.w1.weight": [ffn, hidden],
                       f"{p}block_sparse_moe.experts.{e}.w2.weight": [hidden, ffn],
                       f"{p}block_sparse_moe.experts.{e}.w3.weight": [ffn, hidden]}
        shapes |= {f"{p}input_layernorm.weight": [hidden], f"{p}post_attention_layernorm.weight": [hidden]}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    tmp = final.with_name(f".{final.name}-building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    text = json.dumps(header).encode()
    with (tmp / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)  # the data as a hole: the dry run reads none of it
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, tmp / name)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": 2, "vocab_size": vocab, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_local_experts": experts, "num_experts_per_tok": 2, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    (tmp / "config.json").write_text(json.dumps(config))
    try:
        tmp.rename(final)
    except OSError:  # built at the same time by another session
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.mark.slow
def test_moe_experts_are_listed_merged(ffn320: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    model = model_info(resolve_model(str(tiny_mixtral(ffn320))), None)
    listed = modelchecks.gguf_tensors(model)
    assert listed["blk.0.ffn_down_exps.weight"] == (320, 256, 4) and listed["blk.1.ffn_up_exps.weight"] == (256, 320, 4)
    assert not any(".experts." in n for n in listed)
    tensors = quantized_tensors(listed.items())
    assert "blk.0.ffn_gate_inp.weight" in listed and "blk.0.ffn_gate_inp.weight" not in tensors
    check(parse("ffn_down_exps=q8_0\nffn_(gate|up)_exps=q4_K\n"), tensors)
    with pytest.raises(UsageError, match="line 1: 'ffn_gate_inp' matches no quantized tensor"):
        check(parse("ffn_gate_inp=q8_0\n"), tensors)
    with pytest.raises(UsageError, match="blk.0.ffn_down_exps.weight has rows of 320"):
        check(parse("_exps=q4_K\n"), tensors)
