"""Each format's steps and estimates, in-process, from a ModelInfo read from real headers: a
safetensors file written by hand (an 8-byte length, a JSON header, sparse data) and a
config.json in tmp_path, read by ``model.model_info``, planned by ``pipeline.build_plan``
through the ``FORMATS`` registry. No tools, no environments, no weights."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from qwrap.evaltext import Evaluation
from qwrap.formats import FORMATS
from qwrap.hub import resolve_model
from qwrap.model import Calibration, ModelInfo, model_info
from qwrap.pipeline import build_plan
from qwrap.plan import Plan
from qwrap.request import Request

WORK = ".checkpoint/work"


class Dims(NamedTuple):
    vocab: int
    hidden: int
    layers: int
    ffn: int


def write_model(folder: Path, dims: Dims, *, dtype: str = "BF16", tied: bool = False) -> int:
    """A Llama-shaped folder: config.json and model.safetensors (header by hand, data sparse).
    Returns its parameter count."""
    vocab, hidden, layers, ffn = dims
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = [hidden, hidden]
        shapes[f"{p}mlp.gate_proj.weight"] = [ffn, hidden]
        shapes[f"{p}mlp.up_proj.weight"] = [ffn, hidden]
        shapes[f"{p}mlp.down_proj.weight"] = [hidden, ffn]
        shapes[f"{p}input_layernorm.weight"] = [hidden]
        shapes[f"{p}post_attention_layernorm.weight"] = [hidden]
    shapes["model.norm.weight"] = [hidden]
    if not tied:
        shapes["lm_head.weight"] = [vocab, hidden]
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = params = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n * width]}
        offset += n * width
        params += n
    text = json.dumps(header).encode()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)  # the data, as a hole: only its length is ever read
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "vocab_size": vocab,
              "num_attention_heads": 4, "tie_word_embeddings": tied,
              "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]}
    (folder / "config.json").write_text(json.dumps(config))
    return params


SMALL = Dims(vocab=256, hidden=128, layers=2, ffn=256)
BIG = Dims(vocab=2048, hidden=512, layers=4, ffn=1024)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelInfo]:
    root = tmp_path_factory.mktemp("core-models")
    out = {}
    for name, dims in (("small", SMALL), ("big", BIG)):
        write_model(root / f"tiny-{name}", dims)
        out[name] = model_info(resolve_model(str(root / f"tiny-{name}")), None)
    return out


CALIB = Calibration("sha256:" + "c" * 64, "calib.txt", "/texts/calib.txt")
EVAL = Evaluation("sha256:" + "e" * 64, "eval.txt", "/texts/eval.txt", ctx=128, chunks=4)


def options(fmt: str, **values: Any) -> Any:
    """A format's options value the way the CLI makes it: its option group's defaults, overridden."""
    f = FORMATS[fmt]
    backend = values.pop("backend", None)
    return f.make_options({**{o.name: o.default for o in f.OPTIONS}, **values}, backend)


def request(tmp: Path, **by_format: dict[str, Any]) -> Request:
    return Request(model="m", output=tmp, formats=tuple(by_format),
                   format_options=tuple((f, options(f, **v)) for f, v in by_format.items()))


def plan_for(model: ModelInfo, *, calib: bool = False, ev: Evaluation | None = None,
             **by_format: dict[str, Any]) -> Plan:
    model = dataclasses.replace(model, calibration=CALIB if calib else None, evaluation=ev)
    return build_plan(request(Path("/out"), **by_format), model)


def ids(plan: Plan) -> list[str]:
    return [s.id for s in plan.steps]


def wiring(plan: Plan) -> dict[str, dict[str, str]]:
    return {s.id: dict(s.inputs) for s in plan.steps}


CPU = {"device": "cpu"}  # the GPU question answered without looking for one
GGUF = {"quant": ["Q4_K_M", "Q8_0"], "eval_weights": "off"}


# -- the model from its headers ----------------------------------------------------------------


def test_model_info_reads_the_shape_from_the_headers(tmp_path: Path) -> None:
    params = write_model(tmp_path / "m", SMALL)
    info = model_info(resolve_model(str(tmp_path / "m")), None)
    shape = info.shape
    assert shape.parameters == params
    assert shape.main_dtype == "BF16" and shape.weight_bytes == 2 * params
    assert shape.vocab == 256 and shape.vocab_embed == 256 * 128 and shape.output == 256 * 128
    assert shape.norms == (2 * 2 + 1) * 128
    assert shape.largest_tensor == 256 * 128
    assert info.architecture == "LlamaForCausalLM" and info.source.name == "m"
    write_model(tmp_path / "t", SMALL, tied=True)
    assert model_info(resolve_model(str(tmp_path / "t")), None).shape.output == 0


def test_the_source_fingerprint_follows_the_folder(tmp_path: Path) -> None:
    write_model(tmp_path / "m", SMALL)
    before = model_info(resolve_model(str(tmp_path / "m")), None).fingerprint
    assert model_info(resolve_model(str(tmp_path / "m")), None).fingerprint == before
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    assert model_info(resolve_model(str(tmp_path / "m")), None).fingerprint != before


# -- GGUF ------------------------------------------------------------------------------------


def test_gguf_steps_without_calibration_or_evaluation(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], gguf=GGUF)
    assert ids(plan) == ["gguf.convert", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M",
                         "gguf.quantize:Q8_0", "gguf.validate:Q8_0"]
    assert wiring(plan) == {
        "gguf.convert": {},
        "gguf.quantize:Q4_K_M": {"model": "gguf.convert"},
        "gguf.validate:Q4_K_M": {"artifact": "gguf.quantize:Q4_K_M", "source": "gguf.convert"},
        "gguf.quantize:Q8_0": {"model": "gguf.convert"},
        "gguf.validate:Q8_0": {"artifact": "gguf.quantize:Q8_0", "source": "gguf.convert"},
    }
    by = plan.by_id()
    assert by["gguf.convert"].outputs == (f"{WORK}/tiny-small-BF16.gguf",)  # bf16 weights: a bf16 intermediate
    assert by["gguf.convert"].param("outtype") == "bf16"
    assert by["gguf.convert"].file("model") == str(models["small"].source.path)
    assert by["gguf.quantize:Q4_K_M"].outputs == ("tiny-small-Q4_K_M.gguf.partial",)
    assert by["gguf.validate:Q4_K_M"].outputs == ("tiny-small-Q4_K_M.gguf",)
    assert [s.id for s in plan.steps if s.deliverable] == ["gguf.validate:Q4_K_M", "gguf.validate:Q8_0"]
    assert all(s.format == "gguf" for s in plan.steps)


def test_gguf_quant_names_are_normalized_and_deduplicated(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], gguf={"quant": ["q4_k", "Q4_K_M", "q8-0"], "eval_weights": "off"})
    assert [s.id for s in plan.steps if s.deliverable] == ["gguf.validate:Q4_K_M", "gguf.validate:Q8_0"]


def test_gguf_outtype(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], gguf={**GGUF, "outtype": "f16"})
    assert plan.steps[0].outputs == (f"{WORK}/tiny-small-F16.gguf",)


def test_gguf_computes_an_imatrix_for_low_bit_types_when_calibration_is_there(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], calib=True, gguf=GGUF)
    assert ids(plan) == ["gguf.convert", "gguf.imatrix", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M",
                         "gguf.quantize:Q8_0", "gguf.validate:Q8_0"]
    w = wiring(plan)
    assert w["gguf.imatrix"] == {"model": "gguf.convert"}
    assert w["gguf.quantize:Q4_K_M"] == {"model": "gguf.convert", "imatrix": "gguf.imatrix"}
    assert w["gguf.quantize:Q8_0"] == {"model": "gguf.convert"}  # Q8_0 ignores an imatrix
    imatrix = plan.by_id()["gguf.imatrix"]
    assert imatrix.file("calib") == CALIB.path and imatrix.param("calib") == CALIB.identity
    assert imatrix.threaded and not imatrix.deliverable


def test_gguf_without_an_imatrix(models: dict[str, ModelInfo]) -> None:
    no = plan_for(models["small"], calib=True, gguf={**GGUF, "no_imatrix": True})
    assert "gguf.imatrix" not in ids(no)
    assert wiring(no)["gguf.quantize:Q4_K_M"] == {"model": "gguf.convert"}
    only_8 = plan_for(models["small"], calib=True, gguf={"quant": ["Q8_0"], "eval_weights": "off"})
    assert "gguf.imatrix" not in ids(only_8)  # no type of 4 bits or less: none by default


def test_gguf_with_a_users_imatrix_file(models: dict[str, ModelInfo], tmp_path: Path) -> None:
    from qwrap.journal import sha256_file

    given = tmp_path / "my.imatrix"
    given.write_bytes(b"imatrix bytes")
    plan = plan_for(models["small"], gguf={**GGUF, "imatrix": str(given)})
    assert "gguf.imatrix" not in ids(plan)
    q4, q8 = plan.by_id()["gguf.quantize:Q4_K_M"], plan.by_id()["gguf.quantize:Q8_0"]
    assert q4.file("imatrix") == str(given.resolve()) and q4.param("imatrix_sha256") == sha256_file(given)
    assert dict(q8.files) == {}
    given.write_bytes(b"other bytes")  # its content, not its name, is in the fingerprint
    again = plan_for(models["small"], gguf={**GGUF, "imatrix": str(given)})
    assert again.by_id()["gguf.quantize:Q4_K_M"].fingerprint != q4.fingerprint
    assert again.by_id()["gguf.quantize:Q8_0"].fingerprint == q8.fingerprint


def test_gguf_evaluation_measures_each_type_against_one_base(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], ev=EVAL, gguf=GGUF)
    assert ids(plan) == ["gguf.convert", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M", "gguf.eval-base",
                         "gguf.eval:Q4_K_M", "gguf.quantize:Q8_0", "gguf.validate:Q8_0", "gguf.eval:Q8_0"]
    w = wiring(plan)
    assert w["gguf.eval-base"] == {"model": "gguf.convert"}
    assert w["gguf.eval:Q8_0"] == {"artifact": "gguf.validate:Q8_0", "base": "gguf.eval-base"}
    base = plan.by_id()["gguf.eval-base"]
    assert base.param("ctx") == 128 and base.param("chunks") == 4 and base.file("text") == EVAL.path
    assert base.provides and not base.deliverable
    assert not plan.by_id()["gguf.eval:Q8_0"].outputs


def test_gguf_weights_view_only_when_asked(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], ev=EVAL, gguf={**GGUF, "eval_weights": "on"})
    w = wiring(plan)
    assert w["gguf.weights:Q4_K_M"] == {"artifact": "gguf.validate:Q4_K_M", "tokens": "gguf.eval-base"}
    assert {i for i in ids(plan) if i.startswith("gguf.weights")} == {"gguf.weights:Q4_K_M", "gguf.weights:Q8_0"}
    assert not any(i.startswith("gguf.weights") for i in ids(plan_for(models["small"], gguf={**GGUF,
                                                                                         "eval_weights": "on"})))


def test_gguf_split_after_validation_when_the_estimate_exceeds_the_size(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["big"], gguf={"quant": ["Q8_0"], "eval_weights": "off", "split_max_size": "5M"})
    by = plan.by_id()
    size = by["gguf.quantize:Q8_0"].estimate.output_bytes
    shards = -(-size // 5_000_000)
    assert shards > 1
    assert ids(plan) == ["gguf.convert", "gguf.quantize:Q8_0", "gguf.validate:Q8_0", "gguf.split:Q8_0"]
    assert not by["gguf.validate:Q8_0"].deliverable
    assert by["gguf.validate:Q8_0"].outputs == (f"{WORK}/tiny-big-Q8_0.gguf",)
    assert by["gguf.split:Q8_0"].deliverable
    assert by["gguf.split:Q8_0"].outputs == (f"tiny-big-Q8_0-00001-of-{shards:05d}.gguf",)
    assert dict(by["gguf.split:Q8_0"].inputs) == {"artifact": "gguf.validate:Q8_0", "quantized": "gguf.quantize:Q8_0"}
    unsplit = plan_for(models["big"], gguf={"quant": ["Q8_0"], "eval_weights": "off"})
    assert "gguf.split:Q8_0" not in ids(unsplit)


# -- AWQ and GPTQ ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_hf_format_steps(models: dict[str, ModelInfo], fmt: str) -> None:
    plan = plan_for(models["small"], calib=True, **{fmt: CPU})  # type: ignore[arg-type]
    assert ids(plan) == [f"{fmt}.quantize", f"{fmt}.validate"]
    q, v = plan.steps
    name = f"tiny-small-{fmt.upper()}-4bit-g128"
    assert q.outputs == (name + ".partial",) and v.outputs == (name,)
    assert dict(v.inputs) == {"artifact": q.id} and v.deliverable and not q.deliverable
    assert q.file("model") == str(models["small"].source.path) and q.file("calib") == CALIB.path
    assert q.param("backend") == FORMATS[fmt].BACKENDS[0] and q.param("calib") == CALIB.identity
    assert q.exclusive is not None and q.exclusive == v.exclusive  # one backend worker at a time
    assert q.scratch == (f".checkpoint/layers/{fmt}-{q.fingerprint[:12]}",)
    assert q.threaded and not q.gpu  # --device cpu: the worker's threads are the runner's
    assert v.param("eval_chunks") is None


def test_awq_and_gptq_own_options_reach_their_steps(models: dict[str, ModelInfo]) -> None:
    plan = plan_for(models["small"], calib=True,
                    awq={**CPU, "backend": "gptqmodel", "awq_version": "gemv", "zero_point": False, "group_size": 64},
                    gptq={**CPU, "bits": 8, "act_order": True, "sym": False, "damp": 0.05})
    by = plan.by_id()
    awq_q, gptq_q = by["awq.quantize"], by["gptq.quantize"]
    assert awq_q.param("backend") == "gptqmodel" and awq_q.param("group_size") == 64
    assert awq_q.param("job") == {"zero_point": False, "version": "gemv"}
    assert gptq_q.param("job") == {"sym": False, "act_order": True, "damp": 0.05}
    assert by["gptq.validate"].outputs == ("tiny-small-GPTQ-8bit-g128",)
    assert by["awq.validate"].param("quant") == "4bit-g64"


def test_hf_validation_reads_ggufs_evaluation_tokens_when_gguf_is_planned_too(models: dict[str, ModelInfo]) -> None:
    both = plan_for(models["small"], calib=True, ev=EVAL, gptq=CPU, gguf=GGUF)  # registry order, whatever is given
    assert ids(both)[0] == "gguf.convert" and ids(both)[-2:] == ["gptq.quantize", "gptq.validate"]
    v = both.by_id()["gptq.validate"]
    assert dict(v.inputs) == {"artifact": "gptq.quantize", "tokens": "gguf.eval-base"}
    assert v.param("eval_chunks") == 4 and v.param("eval_ctx") == 128 and "eval_text" not in dict(v.files)
    alone = plan_for(models["small"], calib=True, ev=EVAL, gptq=CPU).by_id()["gptq.validate"]
    assert dict(alone.inputs) == {"artifact": "gptq.quantize"} and alone.file("eval_text") == EVAL.path


# -- estimates -------------------------------------------------------------------------------


def everything(model: ModelInfo) -> Plan:
    return plan_for(model, calib=True, ev=EVAL, gguf={**GGUF, "eval_weights": "on"}, awq=CPU, gptq=CPU)


def test_every_estimate_is_positive(models: dict[str, ModelInfo]) -> None:
    plan = everything(models["small"])
    assert len(plan.steps) == 15
    for s in plan.steps:
        e = s.estimate
        assert e.peak_ram_bytes > 0, s.id
        assert e.seconds is None or e.seconds > 0, s.id
        if s.outputs:
            assert e.output_bytes > 0 and e.peak_disk_bytes >= 0, s.id
    timed = {s.id for s in plan.steps if s.estimate.seconds is not None}
    assert {"gguf.convert", "gguf.quantize:Q4_K_M", "gguf.validate:Q8_0", "gguf.eval:Q8_0", "gptq.validate"} <= timed
    totals = plan.totals()
    assert totals["output_bytes"] == sum(s.estimate.output_bytes for s in plan.steps if s.deliverable) > 0


def test_estimates_scale_with_the_model(models: dict[str, ModelInfo]) -> None:
    small, big = (everything(models[m]).by_id() for m in ("small", "big"))
    assert set(small) == set(big)
    for step_id, s in small.items():
        e, f = s.estimate, big[step_id].estimate
        assert f.peak_ram_bytes > e.peak_ram_bytes, step_id
        if e.output_bytes:
            assert f.output_bytes > e.output_bytes, step_id
        if e.seconds is not None:
            assert f.seconds is not None and f.seconds > e.seconds, step_id


def test_artifact_sizes_follow_the_bits(models: dict[str, ModelInfo]) -> None:
    shape = models["big"].shape
    by = plan_for(models["big"], calib=True, gguf=GGUF, awq=CPU, gptq={**CPU, "bits": 8}).by_id()
    size = {i: s.estimate.output_bytes for i, s in by.items()}
    assert size["gguf.convert"] > size["gguf.validate:Q8_0"] > size["gguf.validate:Q4_K_M"]
    assert size["gguf.validate:Q4_K_M"] == size["gguf.quantize:Q4_K_M"]  # the same bytes, renamed
    assert 8.0 < size["gguf.validate:Q8_0"] * 8 / shape.parameters < 9.0
    assert 15.5 < size["gguf.convert"] * 8 / shape.parameters < 17.0
    assert size["gptq.validate"] > size["awq.validate"]  # 8 bits against 4
    assert size["awq.validate"] < size["gguf.convert"] / 2


def test_the_evaluation_estimate_grows_with_its_chunks(models: dict[str, ModelInfo]) -> None:
    few, many = (plan_for(models["small"], ev=dataclasses.replace(EVAL, chunks=c), gguf=GGUF).by_id()
                 for c in (2, 8))
    for step_id in ("gguf.eval-base", "gguf.eval:Q4_K_M"):
        assert many[step_id].estimate.seconds > few[step_id].estimate.seconds  # type: ignore[operator]
    assert many["gguf.eval-base"].estimate.output_bytes > few["gguf.eval-base"].estimate.output_bytes
    assert many["gguf.quantize:Q4_K_M"].estimate == few["gguf.quantize:Q4_K_M"].estimate


# -- what a change invalidates, through real formats ----------------------------------------------


def changed(a: Plan, b: Plan) -> set[str]:
    fa, fb = ({s.id: s.fingerprint for s in p.steps} for p in (a, b))
    assert set(fa) == set(fb)
    return {i for i in fa if fa[i] != fb[i]}


def test_other_calibration_text_reruns_what_reads_it_and_nothing_else(models: dict[str, ModelInfo]) -> None:
    model = dataclasses.replace(models["small"], calibration=CALIB, evaluation=EVAL)
    req = request(Path("/out"), gguf=GGUF, awq=CPU)
    other = dataclasses.replace(model, calibration=dataclasses.replace(CALIB, identity="sha256:" + "d" * 64))
    assert changed(build_plan(req, model), build_plan(req, other)) == {
        "gguf.imatrix", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M", "gguf.eval:Q4_K_M",
        "awq.quantize", "awq.validate"}


def test_an_option_of_one_format_leaves_the_others_alone(models: dict[str, ModelInfo]) -> None:
    model = dataclasses.replace(models["small"], calibration=CALIB)
    before = build_plan(request(Path("/out"), gguf=GGUF, awq=CPU, gptq=CPU), model)
    after = build_plan(request(Path("/out"), gguf=GGUF, awq={**CPU, "group_size": 64}, gptq=CPU), model)
    assert changed(before, after) == {"awq.quantize", "awq.validate"}


def test_another_source_reruns_everything(models: dict[str, ModelInfo]) -> None:
    req = request(Path("/out"), gguf=GGUF, gptq=CPU)
    small = build_plan(req, models["small"])
    moved = dataclasses.replace(models["small"], source=dataclasses.replace(models["small"].source,
                                                                            repo_id="org/m", revision="abc"))
    assert changed(small, build_plan(req, moved)) == {s.id for s in small.steps}
