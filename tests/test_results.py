"""The typed result, in-process: built once from a recorded outcome (a real plan, journal records
with the facts each step kind returns), read back with its schema checked, and rendered by the
table, the model card and the quality page from one column spec."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from qwrap import modelcard, pipeline, quality, qualitypage, report, results
from qwrap.errors import QualityGateError, UsageError
from qwrap.evaltext import Evaluation
from qwrap.formats import FORMATS
from qwrap.hub import resolve_model
from qwrap.journal import StepRecord, checkpoint_dir
from qwrap.model import Calibration, model_info
from qwrap.plan import StepState
from qwrap.quality import Figure, SchemaError
from qwrap.request import Request
from qwrap.results import RunOutcome, RunResult, build_result
from qwrap.runner import StepSummary
from test_core_formats import Dims, write_model

TINY = Dims(vocab=256, hidden=64, layers=2, ffn=128)


# What each GGUF step kind returns (its facts), as the actions record them in the journal.
KLD = {"Q4_K_M": 0.0412, "Q8_0": 0.00093}


def _facts(kind: str, quant: str | None) -> dict[str, Any]:
    if kind == "gguf.quantize":
        return {"bits_per_weight": {"Q4_K_M": 5.12, "Q8_0": 8.5}[str(quant)]}
    if kind == "gguf.validate":
        return {"validated": True, "architecture": "llama"}
    if kind == "gguf.eval-base":
        return {"ppl_base": 21.5, "ctx": 128, "chunks": 2}
    if kind == "gguf.eval":
        kld = KLD[str(quant)]
        return {"quality": {"kld_mean": kld, "kld_p99": 10 * kld, "ppl": 21.5 + kld, "ppl_base": 21.5,
                            "delta_ppl": kld, "top1_agreement": 1 - kld, "tokens": 126, "ctx": 128,
                            "runtime": "llama.cpp", "weights": None}}
    return {}


@pytest.fixture
def outcome(tmp_path: Path) -> RunOutcome:
    write_model(tmp_path / "tiny", TINY, dtype="F16")
    source = resolve_model(str(tmp_path / "tiny"))
    calib = Calibration("sha256:" + "c" * 64, "calib.txt", str(tmp_path / "calib.txt"))
    model = dataclasses.replace(model_info(source, calib),
                                evaluation=Evaluation("sha256:" + "e" * 64, "eval.txt", "/x/eval.txt", 128, 2))
    options = FORMATS["gguf"].make_options({"quant": ["Q4_K_M", "Q8_0"], "eval_weights": "off"}, None)
    request = Request(model=str(source.path), output=tmp_path / "out", formats=("gguf",),
                      format_options=(("gguf", options),), max_kld=("Q4_K_M=0.01",))
    plan = pipeline.build_plan(request, model)
    summaries = []
    for i, step in enumerate(plan.steps):
        outputs = tuple({"path": p.removesuffix(".partial"), "bytes": 1000 + i, "sha256": f"{i:064x}"}
                        for p in step.outputs)
        record = StepRecord(step.id, StepState.DONE, step.fingerprint, outputs, _facts(step.kind, step.param("quant")),
                            seconds=1.5 + i, peak_rss_bytes=(i + 1) << 20)
        # the Q8_0 chain was reused from an earlier run
        state = StepState.SKIPPED if step.param("quant") == "Q8_0" else StepState.DONE
        summaries.append(StepSummary(step, state, record))
    return RunOutcome(request, model, plan, summaries, ["a warning"], ["qwrap", "run", str(source.path)])


def test_build_result_from_a_recorded_outcome(outcome: RunOutcome) -> None:
    result = build_result(outcome)
    by_quant = {a.quant: a for a in result.artifacts}
    assert list(by_quant) == ["Q4_K_M", "Q8_0"]  # the deliverables, in plan order
    q4 = by_quant["Q4_K_M"]
    validate = next(s for s in outcome.summaries if s.step.id == "gguf.validate:Q4_K_M")
    assert validate.record is not None
    assert q4.path == str(outcome.request.output / "tiny-Q4_K_M.gguf")
    assert (q4.bytes, q4.sha256) == (validate.record.outputs[0]["bytes"], validate.record.outputs[0]["sha256"])
    assert q4.bits_per_weight == 5.12 and q4.validated and not q4.reused
    # the time of the chain that made it (validate and the steps of its format it reads: the
    # quantization, the 16-bit conversion), its peak memory the largest of theirs
    chain = [s.record for s in outcome.summaries if s.record is not None and s.step.id in
             {"gguf.validate:Q4_K_M", "gguf.quantize:Q4_K_M", "gguf.convert"}]
    assert len(chain) == 3 and q4.seconds == pytest.approx(sum(r.seconds or 0 for r in chain))
    assert q4.peak_rss_bytes == max(r.peak_rss_bytes for r in chain)
    assert q4.quality is not None and q4.quality.kld_mean == KLD["Q4_K_M"] and q4.quality.runtime == "llama.cpp"
    assert q4.quality.weights is None and q4.quality.weights_unavailable  # eval_weights off says why
    # what the renderers need from the format travels in the row
    assert q4.library == "gguf" and "tiny-Q4_K_M.gguf" in q4.usage and str(outcome.request.output) not in q4.usage
    # the gate: Q4_K_M has its own limit and is over it, Q8_0 has none
    assert q4.gate == "failed" and by_quant["Q8_0"].gate is None and by_quant["Q8_0"].reused
    assert result.failed_gates == (q4,) and result.exit_code() == 17
    with pytest.raises(QualityGateError, match="gguf Q4_K_M"):
        result.raise_for_gates()
    ref = result.quality_reference
    assert ref is not None and (ref.chunks, ref.ctx, ref.ppl_base) == (2, 128, 21.5)
    assert ref.tokens_scored == 2 * (128 - 1 - 64)
    assert result.calibration == results.CalibrationUse("used", "calib.txt")
    assert [s.id for s in result.steps] == [s.id for s in outcome.plan.steps]
    assert result.warnings == ("a warning",) and result.command[:2] == ("qwrap", "run")


def test_a_step_run_applies_no_gates(outcome: RunOutcome) -> None:
    result = build_result(dataclasses.replace(outcome, complete=False))
    assert [a.gate for a in result.artifacts] == ["failed", None]  # the row still says so
    assert result.failed_gates == () and result.exit_code() == 0
    result.raise_for_gates()


def test_calibration_missing_or_not_needed_is_said(outcome: RunOutcome) -> None:
    missing = dataclasses.replace(outcome, model=dataclasses.replace(outcome.model, calibration=None),
                                  calibration_note="no calibration text (the Hub is unreachable): no importance matrix")
    card = modelcard.render(build_result(missing))
    assert "Calibration data: none, although wanted: no calibration text (the Hub is unreachable)" in card
    plain = dataclasses.replace(missing, calibration_note="")
    assert "Calibration data: none (not needed for these formats)." in modelcard.render(build_result(plain))
    assert "Calibration data: `calib.txt`." in modelcard.render(build_result(outcome))


def test_the_result_round_trips_through_json(outcome: RunOutcome) -> None:
    result = build_result(outcome)
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["schema"] == "qwrap.result/2" and doc["artifacts"][0]["quality"]["kld_mean"] == KLD["Q4_K_M"]
    assert RunResult.from_json(doc) == result


@pytest.mark.parametrize(("path", "value", "message"), [
    (("artifacts", 0, "validated"), "yes", "artifacts[0].validated is 'yes'"),
    (("artifacts", 0, "quality", "kld_mean"), "low", "kld_mean is 'low'"),
    (("artifacts", 0, "quality", "kld_p95"), 0.1, "unknown figures ['kld_p95']"),
    (("model",), None, "result.model is None"),
    (("calibration", "state"), "maybe", "calibration.state is 'maybe'"),
    (("schema",), "qwrap.result/1", "qwrap.result/1"),
])
def test_a_damaged_result_names_the_field(outcome: RunOutcome, path: tuple[Any, ...], value: Any,
                                          message: str) -> None:
    doc = build_result(outcome).to_json()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RunResult.from_json(doc)


def test_result_json_is_saved_whole_and_loaded_checked(outcome: RunOutcome) -> None:
    out = outcome.request.output
    out.mkdir()
    with pytest.raises(UsageError, match="holds no finished qwrap run"):
        results.load(out)
    result = build_result(outcome)
    path = results.save(out, result)
    assert results.load(out) == result and not list(path.parent.glob("*.tmp"))
    doc = json.loads(path.read_text())
    del doc["artifacts"][1]["usage"]
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"artifacts\[1\] has no 'usage'") as err:
        results.load(out)
    assert err.value.hint and "qwrap run" in err.value.hint
    assert checkpoint_dir(out) == path.parent


def _table(result: RunResult) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None)
    report.render_table(result, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_every_renderer_shows_the_column_spec(outcome: RunOutcome) -> None:
    result = build_result(outcome)
    table, card = _table(result), modelcard.render(result)
    page = qualitypage.render(result, outcome.request.output, None, reference_bytes=None)
    for renderer, text in (("table", table), ("card", card), ("page", page)):
        for figure in quality.columns(renderer):
            assert figure.title.replace("Δ", "") in text.replace("&#x27;", "'").replace("Δ", ""), (renderer, figure)
    assert "0.0412 over --max-kld" in table and "0.0412 (over the limit)" in card
    assert "library_name: gguf" in card and "llama-cli -m tiny-Q4_K_M.gguf" in card
    assert card.count("llama-cli -m") == 1  # one usage per format, not per file


def test_a_new_figure_is_one_spec_entry(outcome: RunOutcome, monkeypatch: pytest.MonkeyPatch) -> None:
    """A figure added to quality.FIGURES is read from the facts, kept in the result and shown by
    all three renderers, with no other change."""
    extra = Figure("kld_p95", "KLD p95", "{:.3f}", quality.RENDERERS)
    monkeypatch.setattr(quality, "FIGURES", (*quality.FIGURES, extra))
    monkeypatch.setattr(quality, "FIGURE_KEYS", quality.FIGURE_KEYS | {"kld_p95"})
    for s in outcome.summaries:
        if s.step.kind == "gguf.eval" and s.record is not None:
            s.record.info["quality"]["kld_p95"] = 0.123
    result = build_result(outcome)
    assert RunResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    page = qualitypage.render(result, outcome.request.output, None, reference_bytes=None)
    for text in (_table(result), modelcard.render(result), page):
        assert "KLD p95" in text and "0.123" in text


def test_standard_errors_travel_from_the_facts_to_every_renderer(outcome: RunOutcome) -> None:
    """The errors an evaluation records are kept in the result beside their figures, round-trip
    through result.json, and every renderer shows them as "value ± error"."""
    errors = {"kld_mean_se": 0.0012, "ppl_se": 0.31, "ppl_base_se": 0.3, "delta_ppl_se": 0.021,
              "top1_agreement_se": 0.004}
    for s in outcome.summaries:
        if s.step.kind == "gguf.eval" and s.record is not None:
            s.record.info["quality"].update(errors)
    result = build_result(outcome)
    q4 = result.artifacts[0].quality
    assert q4 is not None and {k: q4.figures[k] for k in errors} == errors and q4.kld_mean_se == 0.0012
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["artifacts"][0]["quality"]["kld_mean_se"] == 0.0012
    assert RunResult.from_json(doc) == result
    page = qualitypage.render(result, outcome.request.output, None, reference_bytes=None)
    for text in (_table(result), modelcard.render(result), page):
        assert "0.0412 ± 0.0012" in text and "95.9% ± 0.40%" in text
    # a result.json written before the errors were kept loads, and shows its figures bare
    for row in doc["artifacts"]:
        for key in quality.SE_KEYS:
            del row["quality"][key]
    old = RunResult.from_json(doc)
    assert old.artifacts[0].kld_mean == 0.0412 and old.artifacts[0].quality.kld_mean_se is None  # type: ignore[union-attr]
    assert "±" not in _table(old) and "±" not in modelcard.render(old)
