"""request -> checks -> plan -> run -> result: the whole of ``qwrap run`` minus rendering."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import calib_source, modelcard, supervisor
from .context import Reporter, RunContext
from .errors import QwrapError, UsageError
from .formats import FORMATS
from .hub import ModelSource, parameter_counts, resolve_model
from .journal import Journal, fingerprint_tree, output_lock, sha256_file
from .plan import Plan, StepBuilder
from .preflight import Report, read_config, require_supported_architecture, run_preflight, tokenizer_check
from .report import build_result
from .request import Request, check_basic
from .runner import Runner, RunOutcome, remove_intermediates
from .toolchain import REPO_ROOT, find_toolchain, read_pin


def validate(request: Request) -> None:
    check_basic(request)
    for fmt in request.formats:
        if fmt not in FORMATS:
            raise UsageError(f"format {fmt} is not available in this qwrap build")
        FORMATS[fmt].validate_options(request)


def needs_calibration(request: Request) -> bool:
    return request.imatrix == "auto" or any(f in ("awq", "gptq") for f in request.formats)


def resolve_calibration(request: Request, token: str | None, reporter: Reporter) -> Path | None:
    """A plain-text calibration file: --calib FILE, or WikiText-2 converted once in a child."""
    if not needs_calibration(request):
        return None
    if request.calib not in (None, "wikitext2"):
        return Path(str(request.calib)).resolve()
    parquet = calib_source.wikitext2("train", token=token)
    text = calib_source.text_path(parquet)
    if not text.exists():
        from . import envs

        python = str(envs.find_env("convert").python)
        argv = calib_source.conversion_argv(parquet, python=python)
        result = supervisor.run(argv, env={"PYTHONPATH": str(REPO_ROOT / "wrapper")})
        if not result.ok:
            raise UsageError(
                "could not turn the WikiText-2 parquet file into text",
                hint="Pass --calib FILE with a plain text file.",
            )
    return text


def build_plan(request: Request, source: ModelSource, calib: Path | None) -> Plan:
    pin = read_pin().commit
    calib_sha = sha256_file(calib) if calib is not None else None
    b = StepBuilder(fingerprint_tree(source.path), pin)
    for fmt in request.formats:
        FORMATS[fmt].add_steps(b, request, source, calib_sha)
    return b.plan()


def check_toolchain(request: Request) -> None:
    """Every tool and environment the run needs exists, before any heavy work."""
    from . import envs

    if "gguf" in request.formats:
        tools = find_toolchain()
        tools.converter  # noqa: B018 - raises with the fix when missing
    if "gguf" in request.formats or (needs_calibration(request) and request.calib in (None, "wikitext2")):
        envs.find_env("convert")
    o = request.quant_options
    if "awq" in request.formats:
        envs.find_env(o.awq_backend)
    if "gptq" in request.formats:
        envs.find_env(o.gptq_backend)
    if {"awq", "gptq"} & set(request.formats):
        envs.find_env("gptqmodel")  # validation reloads artifacts there


def plan_only(request: Request, *, token: str | None) -> Report:
    """`qwrap plan`: every check and estimate, no weights downloaded, nothing written."""
    validate(request)
    source = resolve_model(request.model, revision=request.revision, token=token, weights=False)
    report = run_preflight(request, source, token=token, strict=False)
    if "gguf" in request.formats:
        tokenizer_check(report, source)
    try:
        check_toolchain(request)
        report.check("toolchain", True, "llama.cpp build and environments present")
    except QwrapError as exc:
        report.check("toolchain", False, f"{exc.message} ({exc.hint})")
    return report


def execute(request: Request, *, token: str | None, reporter: Reporter) -> RunOutcome:
    validate(request)
    source = resolve_model(request.model, revision=request.revision, token=token)
    check_toolchain(request)
    if request.preflight and "gguf" in request.formats:
        require_supported_architecture(read_config(source))
    output = request.output
    output.mkdir(parents=True, exist_ok=True)
    with output_lock(output):
        calib = resolve_calibration(request, token, reporter)
        plan = build_plan(request, source, calib)
        journal = Journal(output)
        journal.append({"kind": "run", "request": request.to_json(), "argv": _safe_argv(),
                        "source": {"path": str(source.path), "repo_id": source.repo_id,
                                   "revision": source.revision, "name": source.name}})
        ctx = RunContext(request, source, output, reporter, plan, calib,
                         parameters=sum(parameter_counts(source, token=token).values()))
        summaries = Runner(ctx, journal).run()
        remove_intermediates(ctx)
        outcome = RunOutcome(request, source, plan, summaries, journal.warnings)
        modelcard.write(build_result(outcome), output, calib)
    return outcome


def request_from_journal(output: Path) -> Request:
    """The request of the last run recorded in ``output`` (for ``qwrap resume``)."""
    header = Journal(output).run_header()
    if header is None:
        raise UsageError(
            f"{output} has no qwrap journal to resume from",
            hint="Pass the folder given as --output to a previous `qwrap run`.",
        )
    return Request.from_json(header["request"])


def _safe_argv() -> list[str]:
    """Our command line with any token value removed."""
    out: list[str] = []
    skip = False
    for arg in sys.argv:
        if skip:
            out.append("***")
            skip = False
            continue
        if arg == "--token":
            skip = True
        out.append("--token=***" if arg.startswith("--token=") else arg)
    return [os.path.basename(out[0]), *out[1:]] if out else out
