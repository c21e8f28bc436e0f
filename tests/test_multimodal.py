"""A vision-language model through GGUF, on a tiny Qwen2-VL built offline (its vision tower
random, its tokenizer the real Qwen2 BPE one of test_arch_models): the text files and, beside
them, the projector ``mmproj-<model>-<TYPE>.gguf`` (F16 by default, Q8_0 on request), validated
by loading both in the pinned llama-mtmd-cli on an image, listed in the result and the card,
pushed with the artifacts, in `qwrap plan` exactly as `run` executes it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import run_qwrap
from hubserver import HubServer
from qwrap import publish, results
from qwrap.envs import find_env
from qwrap.errors import UnsupportedModelError
from qwrap.ggufinfo import read_info
from qwrap.toolchain import Toolchain, cache_root
from test_arch_models import qwen3_bpe

# The runs need the toolchain and the gptqmodel environment (which builds the model); the
# tests at the end need neither.
SLOW = (pytest.mark.slow, pytest.mark.backend)


def slow(test: Any) -> Any:
    for mark in SLOW:
        test = mark(test)
    return test

# Run with the gptqmodel environment's Python (transformers 5), given the BPE model's folder
# for its tokenizer. The vision tower's depth is 3: the converter maps the merger's mlp.2 by
# block index, which must be below the depth.
BUILD_QWEN2_VL = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
tokenizer, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(tokenizer)
torch.manual_seed(0)
text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
vision = dict(depth=3, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                       image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)
Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
(out / "preprocessor_config.json").write_text(json.dumps({
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2},
    indent=1))
"""


TOKEN = "hf_writer_0123456789abcdef0123"  # may write to the namespace "me" of the local Hub


def tiny_qwen2_vl() -> Path:
    """The tiny Qwen2-VL, built once per machine."""
    from conftest import built_by_script

    tokenizer = qwen3_bpe()
    key = hashlib.sha256(BUILD_QWEN2_VL.encode() + (tokenizer / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return built_by_script(find_env("gptqmodel").python, cache_root() / "test-models" / f"vlm-{key}" / "tiny-qwen2-vl",
                           BUILD_QWEN2_VL, tokenizer)


@pytest.fixture(scope="module")
def vlm(toolchain: Toolchain) -> Path:
    return tiny_qwen2_vl()


@pytest.fixture(scope="module")
def vlm_run(vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """`qwrap plan` then `qwrap run` with the same options: the text model in Q8_0 and the
    projector in its default type."""
    out = tmp_path_factory.mktemp("vlm") / "out"
    args = (str(vlm), "-o", str(out), "-f", "gguf", "-q", "Q8_0", "--no-eval", "--json")
    plan = run_qwrap("plan", *args)
    assert plan.returncode == 0, plan.stderr[-3000:]
    run = run_qwrap("run", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads(plan.stdout), json.loads(run.stdout)


@slow
def test_the_projector_is_written_beside_the_text_file_and_validated_in_llama_mtmd_cli(vlm_run: tuple) -> None:
    out, _, result = vlm_run
    projector = result["projector"]
    assert projector is not None and projector["validated"] and projector["type"] == "F16"
    path = out / "mmproj-tiny-qwen2-vl-F16.gguf"
    assert Path(projector["path"]) == path and path.is_file() and not Path(f"{path}.partial").exists()
    assert projector["bytes"] == path.stat().st_size
    assert projector["validated_with"] == "tiny-qwen2-vl-Q8_0.gguf"
    assert projector["projector_type"] == "qwen2vl_merger"
    info = read_info(path)
    assert info.metadata["general.type"] == "mmproj" and info.file_type == 1  # F16
    # the text files are the artifacts; the projector is listed beside them, not as one
    assert [a["quant"] for a in result["artifacts"]] == ["Q8_0"]
    assert read_info(out / "tiny-qwen2-vl-Q8_0.gguf").metadata["general.type"] == "model"
    log = (out / ".checkpoint" / "logs" / "gguf.mmproj-validate.log").read_text()
    assert "llama-mtmd-cli" in log and "mtmd batch encoding done" in log
    # the image it was given does not stay behind
    assert not list((out / ".checkpoint").rglob("*.ppm"))


@slow
def test_plan_shows_the_projector_steps_run_executes(vlm_run: tuple) -> None:
    _, plan, result = vlm_run
    planned = {s["id"]: s["fingerprint"] for s in plan["steps"]}
    assert {"gguf.mmproj", "gguf.mmproj-validate"} <= set(planned)
    assert planned == {s["id"]: s["fingerprint"] for s in result["steps"]}
    assert any(c["name"] == "vision projector" and c["ok"] for c in plan["checks"])
    row = next(a for a in plan["artifacts"] if a.get("projector"))
    assert row["name"] == "mmproj-tiny-qwen2-vl-F16.gguf" and row["quant"] == "mmproj F16"
    made = next(s for s in plan["steps"] if s["id"] == "gguf.mmproj")
    assert made["params"]["mmproj_type"] == "f16" and made["params"]["vision_parameters"] > 0


@slow
def test_the_card_lists_the_projector_and_how_to_use_it(vlm_run: tuple) -> None:
    out, _, _ = vlm_run
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card
    assert "| `mmproj-tiny-qwen2-vl-F16.gguf` | gguf | vision projector F16 |" in card
    assert "llama-mtmd-cli -m tiny-qwen2-vl-Q8_0.gguf --mmproj mmproj-tiny-qwen2-vl-F16.gguf" in card
    assert "loaded with `tiny-qwen2-vl-Q8_0.gguf`" in card


@slow
def test_push_uploads_the_projector_with_the_artifacts(vlm_run: tuple, tmp_path: Path) -> None:
    out, _, _ = vlm_run
    sent = [u.path_in_repo for u in publish.uploads(out, results.load(out))]
    assert sent[:2] == ["tiny-qwen2-vl-Q8_0.gguf", "mmproj-tiny-qwen2-vl-F16.gguf"] and "README.md" in sent
    with HubServer(known_tokens={TOKEN}, storage=tmp_path / "hub", write_tokens={"me": {TOKEN}}) as hub:
        proc = run_qwrap("push", str(out), "me/tiny-vlm", "--token", TOKEN,
                         env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        (commit,) = hub.commits
        assert sorted(commit.files) == sorted(sent)
        stored = hub.repos[("model", "me/tiny-vlm")].folder
        assert (stored / "mmproj-tiny-qwen2-vl-F16.gguf").read_bytes() == \
            (out / "mmproj-tiny-qwen2-vl-F16.gguf").read_bytes()


@slow
def test_a_second_run_reuses_everything_and_q8_0_on_request_remakes_only_the_projector(vlm_run: tuple,
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"  # a copy: the other tests read the first run's folder
    shutil.copytree(vlm_run[0], out)
    again = run_qwrap("run", str(results.load(out).model.path), "-o", str(out), "-f", "gguf", "-q", "Q8_0",
                      "--no-eval", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s["state"] for s in json.loads(again.stdout)["steps"]} == {"skipped"}
    q8 = run_qwrap("run", str(results.load(out).model.path), "-o", str(out), "-f", "gguf", "-q", "Q8_0",
                   "--no-eval", "--mmproj-type", "Q8_0", "--json")
    assert q8.returncode == 0, q8.stderr[-3000:]
    result = json.loads(q8.stdout)
    states = {s["id"]: s["state"] for s in result["steps"]}
    assert states["gguf.mmproj"] == states["gguf.mmproj-validate"] == "done"
    assert {states[i] for i in states if "mmproj" not in i} == {"skipped"}
    path = out / "mmproj-tiny-qwen2-vl-Q8_0.gguf"
    assert result["projector"]["type"] == "Q8_0" and Path(result["projector"]["path"]) == path
    assert read_info(path).file_type == 7  # Q8_0
    assert path.stat().st_size < (out / "mmproj-tiny-qwen2-vl-F16.gguf").stat().st_size


@slow
def test_no_mmproj_plans_the_text_model_alone_and_a_bad_type_is_refused(vlm: Path, tmp_path: Path) -> None:
    plan = run_qwrap("plan", str(vlm), "-o", str(tmp_path / "out"), "-q", "Q8_0", "--no-eval", "--no-mmproj",
                     "--json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert not [s["id"] for s in json.loads(plan.stdout)["steps"] if "mmproj" in s["id"]]
    bad = run_qwrap("plan", str(vlm), "-o", str(tmp_path / "out"), "--no-eval", "--mmproj-type", "q4_k")
    assert bad.returncode != 0 and "--mmproj-type" in bad.stderr


@slow
def test_gptq_on_a_vision_model_is_refused_before_any_work_saying_why(vlm: Path, tmp_path: Path, corpus: Path) -> None:
    """GPTQModel quantizes the language model's layers and would keep the vision tower
    unquantized, but loads the checkpoint with its processor, which needs torchvision: its
    environment has none, so the plan says so and the run is refused before any work."""
    args = (str(vlm), "-o", str(tmp_path / "out"), "-f", "gptq", "--calib", str(corpus), "--no-eval")
    plan = run_qwrap("plan", *args, "--json")
    check = next(c for c in json.loads(plan.stdout)["checks"] if c["name"] == "vision tower")
    assert not check["ok"] and "torchvision" in check["detail"] and "unquantized" in check["detail"]
    run = run_qwrap("run", *args)
    assert run.returncode == UnsupportedModelError.exit_code, run.stderr[-2000:]
    assert "--format gguf" in run.stderr and not (tmp_path / "out" / ".checkpoint" / "work").exists()


@slow
def test_a_vision_model_without_its_preprocessor_config_is_refused_in_plan(vlm: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny-qwen2-vl"
    model.mkdir()
    for f in vlm.iterdir():
        if f.name != "preprocessor_config.json":
            (model / f.name).symlink_to(f)
    plan = run_qwrap("plan", str(model), "-o", str(tmp_path / "out"), "-q", "Q8_0", "--no-eval", "--json")
    check = next(c for c in json.loads(plan.stdout)["checks"] if c["name"] == "vision projector")
    assert not check["ok"] and "preprocessor_config.json" in check["detail"]
    run = run_qwrap("run", str(model), "-o", str(tmp_path / "out"), "-q", "Q8_0", "--no-eval")
    assert run.returncode == UnsupportedModelError.exit_code and "--no-mmproj" in run.stderr


# -- without the toolchain ------------------------------------------------------------------


def test_the_converter_s_projector_architectures_are_read_from_its_source(tmp_path: Path) -> None:
    from qwrap.toolchain import mmproj_architectures

    conversion = tmp_path / "conversion"
    conversion.mkdir()
    (conversion / "__init__.py").write_text(
        'TEXT_MODEL_MAP: dict[str, str] = {\n    "LlamaForCausalLM": "llama",\n}\n\n'
        'MMPROJ_MODEL_MAP: dict[str, str] = {\n    "Qwen2VLForConditionalGeneration": "qwenvl",\n'
        "    'LlavaForConditionalGeneration': 'llava',\n}\n")
    assert mmproj_architectures(tmp_path) == {"Qwen2VLForConditionalGeneration", "LlavaForConditionalGeneration"}
    assert mmproj_architectures(tmp_path / "nowhere") == set()


def test_the_validation_image_is_a_binary_ppm(tmp_path: Path) -> None:
    from qwrap.formats.gguf.actions import write_image

    write_image(tmp_path / "i.ppm", 8, 4)
    data = (tmp_path / "i.ppm").read_bytes()
    assert data.startswith(b"P6\n8 4\n255\n") and len(data) == len(b"P6\n8 4\n255\n") + 8 * 4 * 3


def test_a_vision_tower_and_the_projector_name() -> None:
    from qwrap.formats.gguf.steps import mmproj_name
    from qwrap.model import vision_tower

    assert vision_tower({"vision_config": {"depth": 3}}) and not vision_tower({"hidden_size": 8})
    assert mmproj_name("m", "f16") == "mmproj-m-F16.gguf" and mmproj_name("m", "q8_0") == "mmproj-m-Q8_0.gguf"


def test_the_mmproj_options_and_their_json() -> None:
    from qwrap.errors import UsageError
    from qwrap.formats import gguf

    o = gguf.make_options({"mmproj_type": "Q8_0"}, None)
    assert o.mmproj and o.mmproj_type == "q8_0"
    gguf.validate(o)
    assert gguf.options_from_json({"mmproj": False, "mmproj_type": "q8_0"}) == \
        gguf.make_options({"mmproj": False, "mmproj_type": "q8_0"}, None)
    with pytest.raises(UsageError, match="--mmproj-type"):
        gguf.validate(gguf.make_options({"mmproj_type": "q4_k"}, None))


def test_setup_extends_a_build_made_before_a_target_was_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build of the same key without llama-mtmd-cli gets only that target built, in place,
    its marker kept; then `qwrap setup` is a no-op. (cmake and ninja are stand-ins here.)"""
    from qwrap import install
    from qwrap.toolchain import read_pin

    fake = tmp_path / "fake-bin"
    fake.mkdir()
    calls = tmp_path / "cmake-calls"
    (fake / "cmake").write_text(
        '#!/bin/sh\necho "$@" >> "$CMAKE_CALLS"\n[ "$1" = --build ] || exit 0\nout=$2; shift 3\n'
        'for t in "$@"; do [ "$t" = -j ] && break; printf "#!/bin/sh\\n" > "$out/bin/$t"; chmod +x "$out/bin/$t"; done\n')
    (fake / "ninja").write_text("#!/bin/sh\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    monkeypatch.setenv("CMAKE_CALLS", str(calls))
    monkeypatch.setenv("QWRAP_CACHE_DIR", str(tmp_path / "cache"))
    config = install.BuildConfig(read_pin(), cuda=False, native=True)
    old = config.folder
    (old / "bin").mkdir(parents=True)
    for target in install.KEY_TARGETS:
        (old / "bin" / target).write_text("#!/bin/sh\n")
        (old / "bin" / target).chmod(0o755)
    (old / "qwrap-build.json").write_text(json.dumps({"commit": read_pin().commit, "variant": "cpu"}))
    said: list[str] = []
    assert install.build(config, tmp_path / "src", said.append) == old
    assert calls.read_text().split("\n")[0].split() == ["--build", str(old), "--target", "llama-mtmd-cli", "-j",
                                                        str(os.cpu_count() or 1)]
    assert len(calls.read_text().splitlines()) == 1  # not configured again
    assert json.loads((old / "qwrap-build.json").read_text())["targets"] == list(install.TARGETS)
    assert (old / "bin" / "llama-mtmd-cli").is_file() and any("adding llama-mtmd-cli" in s for s in said)
    install.build(config, tmp_path / "src", said.append)
    assert len(calls.read_text().splitlines()) == 1
