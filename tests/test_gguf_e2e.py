"""GGUF end to end: the real pinned llama.cpp on real tiny models built offline."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from background import Lane, fixture_or_outcome, folder, lane, needing, selected
from conftest import PlannedRun, Run, run_qwrap
from qwrap.formats.gguf import QUANT_TYPES
from qwrap.ggufinfo import read_info, tensor_data
from qwrap.toolchain import Toolchain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lane]:
    """The runs of the tests below that each spend seconds in one converter process (a hand
    conversion, conversions that fail), started on a second lane (background.py) when the
    module's first test starts; the shared runs (gguf_run, imatrix_run) go on beside them."""
    names = selected(request)
    root = tmp_path_factory.mktemp("background")

    def job(fn: Callable[..., object], *fixtures: str) -> Callable[..., object]:
        return needing([fixture_or_outcome(request, f) for f in fixtures], fn)

    with lane(root) as on:
        if "test_identical_to_hand_run_tools" in names:
            on.start(("hand",), job(_hand_run_tools, "tiny_model", "toolchain", "convert_python"),
                     folder(root / "hand"))
        if "test_unrecognised_pretokenizer_explained" in names:
            on.start(("gpt2-bpe run",), job(lambda named_model, _: on.qwrap(
                "run", str(named_model("gpt2-bpe")), "-o", str(root / "gpt2-bpe"), "-q", "Q8_0"),
                "named_model", "toolchain"))
        if "test_plan_catches_a_rejected_tokenizer_in_seconds" in names:
            on.start(("gpt2-bpe plan",), job(lambda named_model, _: on.qwrap(
                "plan", str(named_model("gpt2-bpe")), "-o", str(root / "gpt2-bpe-plan"), "--json"),
                "named_model", "toolchain"))
        if "test_an_artifact_llama_cpp_cannot_load_is_a_validation_failure" in names:
            on.start(("no-norm",), job(lambda tiny_model, _: _run_without_norm(on, tiny_model, folder(root / "no-norm")),
                                       "tiny_model", "toolchain"))
        yield on


def test_k_quants_end_to_end(gguf_run: Run, tiny_model: Path) -> None:
    out, result = gguf_run.out, gguf_run.result
    assert result["schema"] == "qwrap.result/2"
    assert result["model"]["name"] == "tiny-llama"
    by_quant = {a["quant"]: a for a in result["artifacts"]}
    assert set(by_quant) == {"Q4_K_M", "Q8_0"}
    for quant, art in by_quant.items():
        path = Path(art["path"])
        assert path == out / f"tiny-llama-{quant}.gguf" and path.is_file()
        assert art["validated"] is True and art["bytes"] == path.stat().st_size
        assert art["peak_rss_bytes"] > 0 and art["seconds"] > 0
        assert 3 < art["bits_per_weight"] < 10
        info = read_info(path)
        assert info.architecture == "llama" and info.file_type == QUANT_TYPES[quant].ftype
        assert len(art["sha256"]) == 64
    assert not list(out.glob("*.partial")), "partial files left behind"
    assert not list((out / ".checkpoint" / "work").glob("*.gguf")), "intermediate not removed"
    assert {s["id"] for s in result["steps"]} >= {"gguf.convert", "gguf.quantize:Q4_K_M", "gguf.validate:Q8_0"}
    assert (out / ".checkpoint" / "logs" / "gguf.convert.log").is_file()


def _hand_run_tools(tiny_model: Path, toolchain: Toolchain, convert_python: Path, tmp_path: Path) -> dict[str, Path]:
    """The tiny model converted to bf16 and quantized to Q4_K_M and Q8_0 by hand."""
    f16 = tmp_path / "hand-BF16.gguf"
    proc = subprocess.run([str(convert_python), str(toolchain.converter), str(tiny_model), "--outfile", str(f16),
                           "--outtype", "bf16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = {}
    for quant in ("Q4_K_M", "Q8_0"):
        made[quant] = hand = tmp_path / f"hand-{quant}.gguf"
        proc = subprocess.run([str(toolchain.tool("llama-quantize")), str(f16), str(hand), quant, "2"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return made


def test_identical_to_hand_run_tools(gguf_run: Run, background: Lane) -> None:
    """qwrap's artifacts hold exactly the tensor data of hand-run convert + llama-quantize."""
    out = gguf_run.out
    for quant, hand in background.result("hand").items():
        ours = out / f"tiny-llama-{quant}.gguf"
        a, b = read_info(ours), read_info(hand)
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        assert [t.ggml_type for t in a.tensors] == [t.ggml_type for t in b.tensors]
        assert tensor_data(ours, a) == tensor_data(hand, b)


def test_rerun_is_a_noop_and_existing_output_refused(gguf_run: Run, tiny_model: Path, tmp_path: Path) -> None:
    out, first = gguf_run.out, gguf_run.result
    again = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "-q", "Q8_0", "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert all(a["reused"] for a in result["artifacts"])
    assert [a["sha256"] for a in result["artifacts"]] == [a["sha256"] for a in first["artifacts"]]
    # The same artifact name in a folder whose journal did not make it: refused without --force.
    other = tmp_path / "foreign"
    other.mkdir()
    (other / "tiny-llama-Q8_0.gguf").write_bytes(b"precious")
    proc = run_qwrap("run", str(tiny_model), "-o", str(other), "-q", "Q8_0")
    assert proc.returncode == 8, proc.stderr
    assert "--force" in proc.stderr and (other / "tiny-llama-Q8_0.gguf").read_bytes() == b"precious"


def test_iq_type_with_auto_imatrix(imatrix_run: PlannedRun) -> None:
    out, result = imatrix_run.out, imatrix_run.result
    assert {a["quant"] for a in result["artifacts"] if a["validated"]} == {"IQ2_XS", "Q4_K_M", "Q8_0"}
    info = read_info(out / "tiny-llama-IQ2_XS.gguf", keep_arrays=False)
    assert info.file_type == QUANT_TYPES["IQ2_XS"].ftype
    assert "quantize.imatrix.file" in info.metadata
    assert "quantize.imatrix.file" not in read_info(out / "tiny-llama-Q8_0.gguf", keep_arrays=False).metadata
    journal = (out / ".checkpoint" / "journal.jsonl").read_text()
    assert '"gguf.imatrix"' in journal


def test_bad_quant_type_fails_before_work(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    proc = run_qwrap("run", str(tiny_model), "-o", str(out), "-q", "Q4_K_M", "-q", "Q7_X")
    assert proc.returncode == 2
    assert "Q7_X" in proc.stderr and "Q4_K_M" in proc.stderr and "IQ4_XS" in proc.stderr
    assert not out.exists()


def test_imatrix_type_without_calibration_fails_up_front(tiny_model: Path, tmp_path: Path) -> None:
    """IQ2_XXS needs an importance matrix, computed by default from calibration text: offline
    without --calib that cannot be, and the run says so before any work."""
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "x"), "-q", "iq2_xxs")
    assert proc.returncode == 5 and "--calib" in proc.stderr, proc.stderr
    assert not list((tmp_path / "x").rglob("*.gguf"))


def test_missing_model(tmp_path: Path) -> None:
    proc = run_qwrap("run", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 3 and "does not exist" in proc.stderr


def test_unsupported_architecture_explained(named_model: Callable[[str], Path], tmp_path: Path,
                                           toolchain: Toolchain) -> None:
    model = named_model("foo")
    proc = run_qwrap("run", str(model), "-o", str(tmp_path / "o"), "-q", "Q8_0")
    assert proc.returncode == 6, proc.stderr
    assert "FooForCausalLM" in proc.stderr and "not supported" in proc.stderr


def test_unrecognised_pretokenizer_explained(background: Lane) -> None:
    proc = background.result("gpt2-bpe run")  # the gpt2-bpe model to Q8_0
    assert proc.returncode == 6, proc.stderr
    assert "pre-tokenizer" in proc.stderr and "QWRAP_LLAMA_CPP_DIR" in proc.stderr


def test_archive_hash_mismatch_refused(tmp_path: Path) -> None:
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the pinned archive")
    proc = run_qwrap("setup", "--no-envs", "--archive", str(fake), env={"QWRAP_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 7, proc.stderr
    assert "REFUSED" in proc.stderr and "sha256" in proc.stderr
    assert not (tmp_path / "cache" / "llama.cpp").exists()


def test_plan_estimates_match_real_sizes(gguf_run: Run, tiny_model: Path, tmp_path: Path) -> None:
    """`qwrap plan` reads only headers; its size estimates are within 10% of the real files."""
    result = gguf_run.result
    proc = run_qwrap("plan", str(tiny_model), "-o", str(tmp_path / "p"), "-q", "Q4_K_M", "-q", "Q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert not (tmp_path / "p").exists(), "plan must not write"
    real = {a["quant"]: a["bytes"] for a in result["artifacts"]}
    for art in plan["artifacts"]:
        assert abs(art["expected_bytes"] - real[art["quant"]]) / real[art["quant"]] < 0.10, art
    checks = {c["name"]: c["ok"] for c in plan["checks"]}
    assert {"architecture", "disk", "toolchain", "tokenizer", "evaluation text"} <= set(checks) and all(checks.values())


def test_plan_catches_a_rejected_tokenizer_in_seconds(background: Lane) -> None:
    proc = background.result("gpt2-bpe plan")  # `qwrap plan` of the gpt2-bpe model
    assert proc.returncode == 0, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert not checks["tokenizer"]["ok"] and "pre-tokenizer" in checks["tokenizer"]["detail"]


def test_events_stream_and_model_card(gguf_run: Run, tmp_path: Path) -> None:
    out = gguf_run.out
    assert gguf_run.events is not None
    events = [json.loads(line) for line in gguf_run.events.read_text().splitlines()]
    assert {e["schema"] for e in events} == {"qwrap.events/1"}
    assert len({e["run_id"] for e in events}) == 1 and all(isinstance(e["ts"], float) for e in events)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and events[-1]["exit_code"] == 0
    validated = [Path(e["path"]).name for e in events if e["event"] == "artifact_validated"]
    assert sorted(validated) == ["tiny-llama-Q4_K_M.gguf", "tiny-llama-Q8_0.gguf"], validated
    started = [e["step"] for e in events if e["event"] == "step_started"]
    # every step once, each after the steps it reads (the two types' steps may interleave)
    assert sorted(started) == sorted(["gguf.convert", "gguf.quantize:Q4_K_M", "gguf.validate:Q4_K_M",
                                      "gguf.quantize:Q8_0", "gguf.validate:Q8_0"]), started
    assert started[0] == "gguf.convert"
    for quant in ("Q4_K_M", "Q8_0"):
        assert started.index(f"gguf.quantize:{quant}") < started.index(f"gguf.validate:{quant}"), started
    card = (out / "README.md").read_text()
    # a local folder's name is no Hub id: no base_model (qwrap run --base-model ORG/NAME sets one)
    assert card.startswith("---\nlibrary_name: gguf\n") and "quantized_by: qwrap" in card
    assert "base_model" not in card.split("---")[1]
    assert "tiny-llama-Q8_0.gguf" in card and "tiny-llama-Q4_K_M.gguf" in card
    assert "0c1e57098bba" in card and "llama-cli -m" in card
    # A failing run ends its stream with the exit code too.
    bad = run_qwrap("run", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--events", str(tmp_path / "bad.ndjson"))
    last = json.loads((tmp_path / "bad.ndjson").read_text().splitlines()[-1])
    assert bad.returncode == 3 and last["event"] == "run_finished" and last["exit_code"] == 3


def test_default_calibration_offline_says_pass_calib(tiny_model: Path, tmp_path: Path, toolchain: Toolchain) -> None:
    proc = run_qwrap("run", str(tiny_model), "-o", str(tmp_path / "o"), "-q", "IQ2_XS", "--imatrix", "auto",
                     env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 5, proc.stderr
    assert "--calib" in proc.stderr and "WikiText-2" in proc.stderr


def _without_tensor(src: Path, dst: Path, name: str) -> None:
    """A copy of a model folder whose safetensors file lacks one tensor (header and data
    rewritten: a well-formed file, just incomplete)."""
    import shutil
    import struct

    shutil.copytree(src, dst)
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    assert name in header, sorted(header)
    del header[name]
    out, offset = [], 0
    for _name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                            key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        out.append(data[begin:end])
        info["data_offsets"] = [offset, offset + end - begin]
        offset += end - begin
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(out))


def _run_without_norm(on: Lane, tiny_model: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    broken = tmp_path / "no-norm"
    _without_tensor(tiny_model, broken, "model.norm.weight")
    out = tmp_path / "o"
    return on.qwrap("run", str(broken), "-o", str(out), "-q", "Q8_0", "--no-eval"), out


def test_an_artifact_llama_cpp_cannot_load_is_a_validation_failure(background: Lane) -> None:
    """The converter and llama-quantize accept a model without its final norm; llama.cpp's
    loader does not: exit 11 (validation failed), not 10 (a tool failed), and nothing under a
    final name."""
    proc, out = background.result("no-norm")  # the tiny model without model.norm.weight, to Q8_0
    assert proc.returncode == 11, proc.stderr
    assert "cannot load the Q8_0 artifact" in proc.stderr and "output_norm" in proc.stderr, proc.stderr
    assert not list(out.glob("*.gguf")), list(out.iterdir())
