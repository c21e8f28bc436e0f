"""request -> model -> checks -> plan -> run -> result: the whole of ``qwrap run`` and ``qwrap
plan`` minus rendering. Both build the plan here, the same way, so they agree on every step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import evaltext, modelcard, outpaths, qualitypage, results
from .checks import Check, raise_first_failure
from .context import Reporter
from .errors import UsageError
from .formats import FORMATS
from .hub import resolve_model
from .journal import Journal
from .locks import folder_lock
from .model import ModelInfo, model_info
from .plan import Plan, PlanBuilder
from .preflight import (
    PlanReport,
    check_toolchain,
    disk_check,
    hub_cache_check,
    model_checks,
    toolchain_check,
)
from .publish import push
from .request import Request, check_basic, safe_argv
from .results import RunOutcome, RunResult, build_result
from .runner import Runner, RunSettings, remove_intermediates
from .texts import calibration, evaluation, warn_overlap, warning_lines
from .toolchain import read_pin
from .units import format_seconds


def validate(request: Request) -> None:
    check_basic(request)
    for fmt in request.formats:
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}", hint=f"Choose from: {', '.join(FORMATS)}.")
        FORMATS[fmt].validate(request.options(fmt))


@dataclass(frozen=True)
class EvalCost:
    """The evaluation's estimated seconds against the rest of the run's (steps with a cost model)."""
    eval_s: float
    build_s: float
    chunks: int

    @property
    def share(self) -> float:
        total = self.eval_s + self.build_s
        return self.eval_s / total if total > 0 else 0.0

    def describe(self) -> str:
        return (f"about {format_seconds(self.eval_s)} of the run's estimated {format_seconds(self.eval_s + self.build_s)} "
                f"({100 * self.share:.0f}%)")

    def warning(self) -> str:
        """Said at the start of a run whose evaluation is long and over its share."""
        if self.eval_s < LONG_EVAL_S or self.share <= evaltext.EVAL_SHARE + 0.1:
            return ""
        if self.chunks > evaltext.MIN_CHUNKS:
            fix = "pass a smaller --eval-tokens, or --no-eval to skip it"
        else:
            fix = f"that is its minimum of {evaltext.MIN_CHUNKS} chunks: pass a smaller --eval-ctx, or --no-eval to skip it"
        return f"the evaluation will take {self.describe()}; {fix}"


LONG_EVAL_S = 600.0


def sized_evaluation(request: Request, model: ModelInfo) -> tuple[ModelInfo, EvalCost | None]:
    """The evaluation's cost and, without --eval-tokens, its size: as many chunks as keep its
    estimated time within evaltext.EVAL_SHARE of the run's. The plan is built at two chunk
    counts: the steps whose estimate changes are the evaluation (a fixed cost plus a cost per
    chunk), the rest is the build; steps without a cost model count as free, so the rule errs
    towards fewer chunks."""
    ev = model.evaluation
    if ev is None:
        return model, None

    def seconds(chunks: int) -> dict[str, float]:
        plan = build_plan(request, dataclasses.replace(model, evaluation=dataclasses.replace(ev, chunks=chunks)))
        return {s.id: s.estimate.seconds or 0.0 for s in plan.steps}

    low = evaltext.MIN_CHUNKS
    one, two = seconds(low), seconds(low + 1)
    evals = {i for i in two if two[i] != one.get(i)}
    per_chunk = sum(two[i] - one[i] for i in evals)
    fixed = sum(one[i] for i in evals) - low * per_chunk
    build = sum(v for i, v in one.items() if i not in evals)
    chunks = ev.chunks if request.eval_tokens > 0 else evaltext.default_chunks(build, fixed, per_chunk, ev.ctx)
    cost = EvalCost(fixed + chunks * per_chunk, build, chunks)
    return dataclasses.replace(model, evaluation=dataclasses.replace(ev, chunks=chunks)), cost


def build_plan(request: Request, model: ModelInfo) -> Plan:
    b = PlanBuilder(model.fingerprint, read_pin().commit, model.shape.parameters)
    # in registry order, whatever the order on the command line: a step one format provides
    # to another (the evaluation's token ids) is in the plan before its readers
    for fmt in (f for f in FORMATS if f in request.formats):
        FORMATS[fmt].add_steps(b, request.options(fmt), model)
    return b.plan()


def plan_only(request: Request, *, token: str | None) -> PlanReport:
    """`qwrap plan`: the plan `run` would execute, every check and estimate; no weights
    downloaded, nothing written."""
    validate(request)
    source = resolve_model(request.model, revision=request.revision, token=token, weights=False)
    calib, calib_note = calibration(request, token, fetch=False)
    model = model_info(source, calib, token=token, weights=False)
    ev, note = evaluation(request, model, token, work=None)
    model, cost = sized_evaluation(request, dataclasses.replace(model, evaluation=ev))
    ev = model.evaluation
    checks = model_checks(request, model, thorough=True)
    if calib_note:
        checks.append(Check("calibration", True, calib_note))
    if request.evaluate:  # informative: a run without evaluation text still makes its artifacts
        sized = "" if request.eval_tokens else f" (sized to keep it within {100 * evaltext.EVAL_SHARE:.0f}% of the run)"
        checks.append(Check("evaluation text", True, note or f"{ev.label if ev else '-'}: "
                            f"{ev.chunks if ev else 0} chunks of {request.eval_ctx} tokens{sized}"
                            + (f"; {cost.describe()}" if cost else "")))
        if cost and cost.warning():
            checks.append(Check("evaluation time", True, cost.warning()))
        precision = evaltext.planned_precision(ev, request.max_kld)
        if precision is not None:
            checks.append(Check("evaluation precision", True, evaltext.precision_text(precision)))
    plan = build_plan(request, model)
    disk, disk_info = disk_check(plan, request.output)
    hub, hub_info = hub_cache_check(model)
    checks += [disk, *([hub] if hub else []), toolchain_check(request)]
    return PlanReport(request, model, plan, tuple(checks), {**disk_info, **({"hub_cache": hub_info} if hub else {})})


def execute(request: Request, *, token: str | None, reporter: Reporter, steps: tuple[str, ...] = ()) -> RunResult:
    """`qwrap run`: the whole plan, or with ``steps`` (``--step``) exactly those steps, beside
    other processes running other steps of the same plan in the same folder. The result is
    built once, here; the whole plan's also becomes the model card, result.json and the
    quality page."""
    validate(request)
    source = resolve_model(request.model, revision=request.revision, token=token)
    model = model_info(source, None, token=token)
    if request.preflight:
        raise_first_failure(model_checks(request, model, thorough=False))
    check_toolchain(request)
    output = request.output
    output.mkdir(parents=True, exist_ok=True)
    outpaths.check(output, outpaths.FIXED)  # before the lock file and the journal are written
    with folder_lock(output, shared=bool(steps)):
        model, calib_note = _with_texts(request, model, token, reporter)
        plan = build_plan(request, model)
        journal = Journal(output)
        journal.append({"kind": "run", "request": request.to_json(), "argv": safe_argv(), "steps": list(steps),
                        "plan": [s.id for s in plan.steps],
                        "source": {"path": str(source.path), "repo_id": source.repo_id,
                                   "revision": source.revision, "name": source.name}})
        settings = RunSettings(output, reporter, request.jobs, request.threads, request.stall_timeout,
                               request.force, request.preflight, steps)
        summaries = Runner(plan, journal, settings).run()
        outcome = RunOutcome(request, model, plan, summaries, journal.warnings, made_by(journal), calib_note,
                             complete=not steps)
        if not request.keep_intermediate and not steps:
            remove_intermediates(plan, output)
        result = build_result(outcome)
        if not steps:  # the documents of the whole plan; a --step run leaves them to the run that ends it
            _finish(result, plan, output, reporter)
    return result


def push_after_run(result: RunResult, repo_id: str | None, *, token: str | None,
                   say: Callable[[str], None]) -> RunResult:
    """``run --push-to``: the journaled final step, only for a whole run whose artifacts all
    passed validation and their quality gates; the result then records what was pushed."""
    if not repo_id or result.failed_gates or not result.complete:
        return result
    pushed = push(result.output, repo_id, token=token, say=say)
    return dataclasses.replace(result, push=pushed.to_json())


def made_by(journal: Journal) -> list[str]:
    """The last `qwrap run` command recorded (a `resume` or `eval` continues what it made)."""
    runs = [r["argv"] for r in journal.records() if r.get("kind") == "run" and r.get("argv", [])[1:2] == ["run"]]
    return runs[-1] if runs else safe_argv()


def _with_texts(request: Request, model: ModelInfo, token: str | None, reporter: Reporter) -> tuple[ModelInfo, str]:
    """The model with its calibration and evaluation texts (fetched when needed), the evaluation
    sized to the run (sized_evaluation); and why calibration text is missing, if it is."""
    calib, calib_note = calibration(request, token, fetch=True)
    model = dataclasses.replace(model, calibration=calib)
    ev, note = evaluation(request, model, token, work=request.output / ".checkpoint" / "work")
    model, cost = sized_evaluation(request, dataclasses.replace(model, evaluation=ev))
    if cost and cost.warning():
        reporter.warning(cost.warning())
    warn_overlap(request, model.evaluation, reporter)
    for line in warning_lines(calib_note, note):  # one line when both texts miss for one cause (no Hub)
        reporter.warning(line)
    return model, calib_note


def _finish(result: RunResult, plan: Plan, output: Path, reporter: Reporter) -> None:
    """After the whole plan: the model card, the saved result and the quality page."""
    modelcard.write(result, output)
    results.save(output, result)
    sixteen = next((s.estimate.output_bytes for s in plan.steps if s.kind.endswith(".convert")), None)
    page = qualitypage.write(output, result, reference_bytes=sixteen)
    if page.note:
        reporter.warning(f"quality page: {page.note}")


def request_from_journal(output: Path) -> Request:
    """The request of the last run recorded in ``output`` (for ``qwrap resume``)."""
    header = Journal(output).run_header()
    if header is None:
        raise UsageError(
            f"{output} has no qwrap journal to resume from",
            hint="Pass the folder given as --output to a previous `qwrap run`.",
        )
    try:
        # the folder given, whatever the journal says: a copied or crafted journal must not send the run elsewhere
        return dataclasses.replace(Request.from_json(header["request"]), output=output.resolve())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"the journal in {output} records a request this qwrap cannot read ({exc!r})",
                         hint="Run `qwrap run` with the options again.") from exc
