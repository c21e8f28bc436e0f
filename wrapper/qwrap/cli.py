"""The typer app: options -> Request, results -> terminal. It parses and renders; the decisions
(gates, push) are the pipeline's and the result's.

``main()`` prints expected errors (message + hint, exit code from errors.py) and writes
unexpected ones to a crash log; tracebacks on screen only with QWRAP_DEBUG=1.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command_from_info, get_command_name
from typer.models import CommandInfo

from . import __version__
from .deferred import defer
from .errors import Interrupted, QwrapError, exit_code_for
from .options import Option
from .workers.backends import BACKENDS as BACKEND_NAMES  # declared once, for the help texts

# typer's help renderer imports these for features qwrap never turns on (deferred.py): ~60 ms
# of every --help
defer("rich.markdown", "Markdown")
defer("rich.traceback", "Traceback")


class _Summary(TyperCommand):
    """A command of the root group before it is built: the name and help its listing reads."""


# the root group's commands, in the order they are listed: name -> (help, makes the callback)
_ON_USE: dict[str, tuple[str, Callable[[], Callable[..., None]]]] = {}


def _command_on_use(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``@app.command(name)``, built when used (``_Root``)."""

    def register(callback: Callable[..., None]) -> Callable[..., None]:
        _ON_USE[name or get_command_name(callback.__name__)] = (inspect.getdoc(callback) or "", lambda: callback)
        return callback

    return register


class _Root(TyperGroup):
    """The root command group. Each command stands in it as its summary until it is invoked,
    completed or its own help asked for: building a command reads its parameters (``run`` and
    ``plan`` take every format's options, declared in ``qwrap.formats``), which the top-level
    ``--help`` that lists them does not need (about 50 ms of each ``qwrap --help``)."""

    def __init__(self, *, commands: dict[str, click.Command], rich_markup_mode: Any, **kwargs: Any) -> None:
        # the listing shows short_help as written; a docstring's first paragraph wraps at 120
        summaries = {name: _Summary(name=name, help=text, short_help=" ".join(text.split("\n\n")[0].split()),
                                    rich_markup_mode=rich_markup_mode)
                     for name, (text, _) in _ON_USE.items()}
        super().__init__(commands={**summaries, **commands}, rich_markup_mode=rich_markup_mode, **kwargs)
        self._listing = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if isinstance(command, _Summary) and not self._listing:
            info = CommandInfo(name=cmd_name, callback=_ON_USE[cmd_name][1]())
            command = self.commands[cmd_name] = get_command_from_info(
                info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=self.rich_markup_mode)
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    cls=_Root,
    suggest_commands=False,  # click suggests close command names itself (typer would repeat it)
    name="qwrap",
    help="Turn a Hugging Face causal LM into validated GGUF, AWQ and GPTQ artifacts.\n\n"
    "Example: qwrap run ./my-model --format gguf --quant Q4_K_M --quant Q8_0 --output out/",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
env_app = typer.Typer(help="Manage the isolated converter/backend environments.", no_args_is_help=True)
app.add_typer(env_app, name="env")

# Not a terminal (CI logs): never wrap messages (paths must stay copyable), wide tables.
err_console = Console(stderr=True, soft_wrap=True)
out_console = Console(width=None if sys.stdout.isatty() else 160)

MODEL_HELP = "Local Hugging Face model folder, or a Hub id `org/name`."
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Events = Annotated[
    Optional[str], typer.Option("--events", help="Write NDJSON events (schema qwrap.events/1) to FILE, or - for stdout.")
]
OutDir = Annotated[Path, typer.Argument(help="The --output folder of a run.")]


def _version(value: bool) -> None:
    if value:
        from .toolchain import read_pin

        typer.echo(f"qwrap {__version__} (llama.cpp {read_pin().commit[:12]})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print versions and exit.")
    ] = False,
) -> None:
    """qwrap: one command from a Hugging Face model to deployable quantized artifacts."""


def _reporter() -> Any:
    from .ui import PlainReporter, RichReporter

    return RichReporter(err_console) if err_console.is_terminal else PlainReporter()


RUN_DOC = """Quantize MODEL into OUTPUT; rerun the same command to resume after any interruption.

Independent steps run at the same time within --jobs cores: the validation of one type overlaps the quantization of the next, and several quantizations share the cores. `qwrap plan` with the same options shows every step, its estimates and the checks.

Examples:

  qwrap run ./Llama-3.2-1B -q Q4_K_M -q Q8_0 -o out/

  qwrap run meta-llama/Llama-3.2-1B --revision main -q IQ3_XXS --imatrix auto --calib wiki.txt -o out/ --json

  qwrap run org/name --format gguf --format awq --format gptq --calib data.txt -o out/

One step of the plan (on a scheduler; other processes or machines may run other steps of it in the same folder at the same time; the steps it reads must be done):

  qwrap run ./Llama-3.2-1B -q Q4_K_M -q Q8_0 -o /shared/out --step gguf.quantize:Q4_K_M
"""

PLAN_DOC = """Show the plan `qwrap run` with the same options executes, and the checks, without heavy work.

Every step with its inputs, outputs, parameters, fingerprint and estimates (output size, peak RAM, peak disk, time where a cost model exists); then the checks: architecture, tokenizer, disk, toolchain. `--json` prints it as one document (schema qwrap.plan/2). Only config.json, the tokenizer and the safetensors headers are read: a Hub model's weights are not downloaded.

Examples:

  qwrap plan ./Llama-3.2-1B -q Q4_K_M -q Q8_0 -o out/

  qwrap plan meta-llama/Llama-3.2-1B -q Q4_K_M --json

Scale out (one job per stage, one task per step, all on one shared output folder):

  qwrap plan ./Llama-3.2-1B -q Q4_K_M -q Q8_0 -o /shared/out --emit slurm jobs/ --partition cpu --gpu-partition gpu && jobs/submit.sh

  qwrap plan ./Llama-3.2-1B -q Q4_K_M -o /shared/out --emit github-actions .github/workflows/quantize.yml
"""

SCALE_PANEL = "Scaling out"
RUN_EXTRA = (
    Option("step", list[str], [], "Run exactly this step of the plan (repeatable; ids as `qwrap plan` shows them); "
           "the steps it reads must be done (exit 22 names them), a step already running elsewhere exits 14.",
           ("--step",), metavar="ID"),
)
PLAN_EXTRA = (
    Option("emit", Optional[tuple[str, Path]], None, "Write the plan as scheduler jobs: `slurm DIR` (sbatch scripts "
           "and DIR/submit.sh) or `github-actions FILE` (a workflow). Memory and time come from the estimates; "
           "multi-threaded steps ask for --jobs cores (default 4).", ("--emit",), metavar="KIND PATH"),
    Option("partition", Optional[str], None, "--emit slurm: the partition of the jobs."),
    Option("gpu_partition", Optional[str], None, "--emit slurm: the partition of GPU steps (AWQ/GPTQ), with --gres=gpu:1."),
    Option("account", Optional[str], None, "--emit slurm: the account the jobs are charged to."),
)


def _run_options() -> tuple[Option, ...]:
    from .formats import FORMATS

    names = ", ".join(FORMATS)
    routes = "; ".join(f"{n.upper()}: {', '.join(f.BACKENDS)}" for n, f in FORMATS.items() if f.BACKENDS)
    return (
        Option("output", Path, Path("qwrap-out"), "Output folder (created if missing).", ("--output", "-o")),
        Option("format", list[str], [next(iter(FORMATS))], f"{names}; repeatable (one download, one calibration set).",
               ("--format", "-f")),
        Option("revision", Optional[str], None, "Hub branch, tag or commit."),
        Option("token", Optional[str], None, "Hub token (default: HF_TOKEN or the stored login). Never logged."),
        Option("calib", Optional[str], None, "Calibration text FILE (.txt or .jsonl); default: WikiText-2 from the Hub."),
        Option("backend", list[str], [], f"{routes}; FORMAT=NAME to be explicit. Repeatable."),
        Option("jobs", int, 0, "CPU cores to keep busy with steps running at once (0: all usable cores)."),
        Option("threads", int, 0, "Threads per tool (0: the free cores shared among the steps running at once)."),
        Option("stall_timeout", float, 600.0, "Kill a tool that prints nothing for this many seconds."),
        Option("keep_intermediate", bool, False, "Keep the 16-bit GGUF and AWQ/GPTQ layer checkpoints in OUT/.checkpoint."),
        Option("force", bool, False, "Overwrite existing artifacts."),
        Option("preflight", bool, True, "Check the model (architecture, group size) and free disk before starting."),
        Option("eval", bool, True, "Measure every artifact against the unquantized model on the same tokens "
               "(KL divergence, PPL, same top-1)."),
        Option("eval_text", Optional[str], None, "Evaluation text FILE (.txt or .jsonl); default: WikiText-2 (test); "
               "offline, the part of --calib that calibration does not use."),
        Option("eval_tokens", int, 0, "Tokens to evaluate (chunks x --eval-ctx). 0: sized to the run, as many chunks "
               "as keep the evaluation within 25% of the run's estimated time on this machine (at least 2 chunks, at "
               "most 16384 tokens; on a CPU that is the minimum, with a GPU more). `qwrap plan` shows the time."),
        Option("eval_ctx", int, 512, "Evaluation chunk length in tokens (the second half of each chunk is scored)."),
        Option("max_kld", list[str], [], "Quality gate: fail (exit 17) when an artifact's mean KLD is over VALUE; "
               "NAME=VALUE for one type or format (Q2_K=0.2, awq=0.05). Repeatable."),
        Option("push_to", Optional[str], None, "After a successful run (artifacts validated, quality gates passed), "
               "push OUT to this Hub repo (as `qwrap push`)."),
        Option("base_model", Optional[str], None, "The model card's base_model (a Hub id) when MODEL is a local folder."),
        Option("json_out", bool, False, "Print one JSON document on stdout.", ("--json",)),
        Option("events", Optional[str], None, "Write NDJSON events (schema qwrap.events/1) to FILE, or - for stdout."),
    )


def _parameter(opt: Option, panel: str | None) -> inspect.Parameter:
    info = typer.Option(*opt.flags, help=opt.help, rich_help_panel=panel,  # no flags: --x/--no-x for bools
                        metavar=opt.metavar)
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=opt.default,
                             annotation=Annotated[opt.type, info])


def _command(impl: Callable[[dict[str, Any]], None], doc: str, extra: tuple[Option, ...] = ()) -> Callable[..., None]:
    """A typer command taking MODEL, the run options and every format's option group (each
    under its own heading in --help), all mounted from the registry, then its own ``extra``."""
    from .formats import FORMATS

    params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=Annotated[str, typer.Argument(help=MODEL_HELP)])]
    seen = {"model"}
    for opt in _run_options():
        params.append(_parameter(opt, None))
        seen.add(opt.name)
    for fmt in FORMATS.values():
        for opt in fmt.OPTIONS:
            if opt.name not in seen:
                params.append(_parameter(opt, f"{fmt.TITLE} options"))
                seen.add(opt.name)
    params += [_parameter(opt, SCALE_PANEL) for opt in extra]

    def command(**values: Any) -> None:
        impl(values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def _run(values: dict[str, Any]) -> None:
    _execute(_request(values), token=values["token"], json_out=values["json_out"], events=values["events"],
             push_to=values["push_to"], steps=tuple(dict.fromkeys(values["step"])))


def _plan(values: dict[str, Any]) -> None:
    from . import pipeline

    request = _request(values)
    plan_report = pipeline.plan_only(request, token=values["token"])
    if values["emit"] is not None:
        from . import scaleout

        kind, dest = values["emit"]
        written = scaleout.emit(kind, Path(dest), plan_report.plan, _task_command(values, request, plan_report),
                                partition=values["partition"], gpu_partition=values["gpu_partition"],
                                account=values["account"], model_name=plan_report.model.source.name,
                                cpus=request.jobs)
        for path in written:
            typer.echo(str(path))
        return
    report = plan_report.to_json()
    if values["json_out"]:
        typer.echo(json.dumps(report, indent=2))
    else:
        from .report import render_plan

        render_plan(report, out_console)


_ON_USE["run"] = (inspect.cleandoc(RUN_DOC), lambda: _command(_run, RUN_DOC, RUN_EXTRA))
_ON_USE["plan"] = (inspect.cleandoc(PLAN_DOC), lambda: _command(_plan, PLAN_DOC, PLAN_EXTRA))

# not carried into a job's command: the job's own choices, the plan command's, and the token
_NOT_IN_JOBS = {"model", "output", "token", "json_out", "events", "jobs", *(o.name for o in PLAN_EXTRA)}


def _task_command(values: dict[str, Any], request: Any, report: Any) -> Any:
    """The `qwrap run` a job runs: the plan's options as typed (defaults left out), with the
    paths made absolute and what this host decided for the defaults pinned
    (scaleout.pinned_defaults); the token never (jobs read HF_TOKEN)."""
    from .formats import FORMATS
    from .scaleout import pinned_defaults
    from .stages import TaskCommand

    resolved = pinned_defaults(values, report)
    args: list[str] = []
    options = [*_run_options(), *(o for f in FORMATS.values() for o in f.OPTIONS)]
    for opt in {o.name: o for o in options}.values():
        value = resolved.get(opt.name, values.get(opt.name))
        if opt.name in _NOT_IN_JOBS or value == opt.default:
            continue
        args += _words(opt, value)
    # the qwrap that wrote the jobs (on a cluster, the submit host's install on the shared filesystem)
    program = (os.path.abspath(sys.argv[0]),) if Path(sys.argv[0]).name == "qwrap" else (
        sys.executable, "-m", "qwrap.cli")
    return TaskCommand(program, request.model, request.output, tuple(args))


def _words(opt: Option, value: Any) -> list[str]:
    flag = opt.cli_flags[0]
    if opt.type is bool:
        return [flag] if opt.flags or value else ["--no-" + opt.name.replace("_", "-")]
    values = value if isinstance(value, list) else [value]
    return [w for v in values for w in (flag, str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists()
                                        else str(v))]


def _request(values: dict[str, Any]) -> Any:
    from .formats import FORMATS
    from .request import Request, backends_from

    model = values["model"]
    if Path(model).exists():
        model = str(Path(model).resolve())  # the journal must work from any directory
    formats = tuple(dict.fromkeys(values["format"]))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        from .errors import UsageError

        raise UsageError(f"unknown format {unknown[0]!r}", hint=f"Choose from: {', '.join(FORMATS)}.")
    backends = backends_from(values["backend"], formats)
    options = tuple((f, FORMATS[f].make_options(values, backends.get(f))) for f in formats)
    calib = values["calib"]
    return Request(
        model=model, output=Path(values["output"]).resolve(), formats=formats, format_options=options,
        revision=values["revision"], calib=str(Path(calib).resolve()) if calib not in (None, "wikitext2") else calib,
        force=values["force"], keep_intermediate=values["keep_intermediate"], threads=values["threads"],
        jobs=values["jobs"], stall_timeout=values["stall_timeout"], preflight=values["preflight"],
        evaluate=values["eval"], eval_text=str(Path(values["eval_text"]).resolve()) if values["eval_text"] else None,
        eval_tokens=values["eval_tokens"], eval_ctx=values["eval_ctx"], max_kld=tuple(values["max_kld"]),
        base_model=values["base_model"],
    )


def _execute(request: Any, *, token: str | None, json_out: bool, events: str | None, push_to: str | None = None,
             steps: tuple[str, ...] = ()) -> None:
    """Run with live progress (and an NDJSON event stream), push when asked, print the result;
    a failed quality gate exits 17 after the table is shown."""
    from . import pipeline
    from .errors import UsageError, exit_code_for
    from .events import EventStream
    from .report import render_table

    if events == "-" and json_out:
        raise UsageError("--events - and --json both want stdout", hint="Write events to a file.")
    with _reporter() as inner:
        stream = EventStream(events, inner) if events else None
        if stream is not None:
            stream.emit("run_started", model=request.model, output=str(request.output),
                        formats=list(request.formats))
        try:
            result = pipeline.execute(request, token=token, reporter=stream or inner, steps=steps)
        except BaseException as exc:
            if stream is not None:
                stream.emit("run_finished", exit_code=exit_code_for(exc), error=str(exc))
                stream.close()
            raise
        if stream is not None:
            stream.emit("run_finished", exit_code=result.exit_code(), artifacts=[a.path for a in result.artifacts])
            stream.close()
    result = pipeline.push_after_run(result, push_to, token=token, say=_say)
    if result.push is not None:
        _say_pushed(result.push)
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
    elif events != "-" and (result.artifacts or not steps):
        render_table(result, out_console)
    result.raise_for_gates()


def _say(line: str) -> None:
    err_console.print(line, highlight=False)


def _say_pushed(pushed: Any) -> None:
    if pushed["commit_url"] is None:
        _say(f"{pushed['repo_id']} is up to date: all {len(pushed['unchanged'])} files are already there")
    else:
        _say(f"pushed {len(pushed['uploaded'])} files ({pushed['bytes_uploaded']:,} bytes; "
             f"{len(pushed['unchanged'])} already there): {pushed['pr_url'] or pushed['commit_url']}")


@_command_on_use()
def push(
    output: OutDir,
    repo_id: Annotated[str, typer.Argument(help="The Hub repo to push to, `org/name` (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="The branch to push to (created if missing); default main.")] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead of committing to the branch.")] = False,
    token: Annotated[Optional[str], typer.Option(help="Hub token with write access (default: HF_TOKEN or the stored login). Never printed or written.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="The model card's base_model (a Hub id), when the source was a local folder.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Publish a finished run: its validated artifacts, the model card, the quality page and plot (and the importance matrix when kept), in one commit.

    Files already on the branch with the same sha256 are not sent again, so a second push uploads nothing and a push cut mid-way resumes where it stopped.

    Examples:

      qwrap push out/ me/Llama-3.2-1B-GGUF

      qwrap push out/ org/model-GPTQ --private --revision v1 --base-model meta-llama/Llama-3.2-1B
    """
    from .publish import push as run_push

    pushed = run_push(output.resolve(), repo_id, token=token, private=private, revision=revision,
                      create_pr=create_pr, base_model=base_model, say=_say).to_json()
    _say_pushed(pushed)
    if json_out:
        typer.echo(json.dumps(pushed, indent=2))


@_command_on_use()
def resume(
    output: OutDir,
    token: Annotated[Optional[str], typer.Option(help="Hub token, if the model must be fetched again.")] = None,
    json_out: JsonFlag = False,
    events: Events = None,
) -> None:
    """Continue the run recorded in OUTPUT's journal, without retyping its options.

    Example: qwrap resume out/
    """
    from . import pipeline

    request = pipeline.request_from_journal(output.resolve())
    _execute(request, token=token, json_out=json_out, events=events)


@_command_on_use("eval")
def eval_command(
    output: OutDir,
    eval_text: Annotated[Optional[Path], typer.Option(help="Evaluation text FILE (.txt or .jsonl); default: the run's.")] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help="Tokens to evaluate (0: sized to the run).")] = None,
    eval_ctx: Annotated[Optional[int], typer.Option(help="Evaluation chunk length in tokens.")] = None,
    max_kld: Annotated[list[str], typer.Option(help="Quality gates, as for `qwrap run` (exit 17 when one fails).")] = [],  # noqa: B006
    token: Annotated[Optional[str], typer.Option(help="Hub token, if the model or text must be fetched again.")] = None,
    json_out: JsonFlag = False,
    events: Events = None,
) -> None:
    """(Re)measure the artifacts of a finished run in OUTPUT: the run's own plan with evaluation on, so every
    artifact is reused and only the measurements run (a 16-bit intermediate deleted after the run is made again).

    Examples:

      qwrap eval out/

      qwrap eval out/ --eval-text held-out.txt --eval-tokens 8192 --max-kld 0.05
    """
    import dataclasses

    from . import pipeline

    request = pipeline.request_from_journal(output.resolve())
    changes: dict[str, Any] = {"evaluate": True}
    if eval_text is not None:
        changes["eval_text"] = str(eval_text.resolve())
    if eval_tokens is not None:
        changes["eval_tokens"] = eval_tokens
    if eval_ctx is not None:
        changes["eval_ctx"] = eval_ctx
    if max_kld:
        changes["max_kld"] = tuple(max_kld)
    _execute(dataclasses.replace(request, **changes), token=token, json_out=json_out, events=events)


@_command_on_use()
def status(output: OutDir, json_out: JsonFlag = False) -> None:
    """Show every step of the plan in OUTPUT, whichever process or machine ran it: state (pending, running, done,
    failed, ...), host, duration, peak memory, output, error.

    Examples:

      qwrap status /shared/out

      qwrap status /shared/out --json
    """
    from .status import collect, render

    info = collect(output.resolve())
    if json_out:
        typer.echo(json.dumps(info, indent=2))
    else:
        render(info, out_console)


@_command_on_use()
def formats(
    architectures: Annotated[bool, typer.Option("--architectures", help="List the model architectures the pinned converter supports.")] = False,
) -> None:
    """List every format and what it can make: GGUF quant types with bits per weight, AWQ/GPTQ bits and backends.

    Example: qwrap formats --architectures
    """
    from rich.table import Table

    from .formats import FORMATS

    if architectures:
        from .toolchain import supported_architectures

        for name in sorted(supported_architectures()):
            typer.echo(name)
        return
    for name, fmt in FORMATS.items():
        listing = fmt.listing()
        table = Table(title=f"{name}: {fmt.SUMMARY}")
        for col in listing.columns:
            table.add_column(col)
        for row in listing.rows:
            table.add_row(*row)
        out_console.print(table)
        if listing.note:
            out_console.print(listing.note)


@_command_on_use()
def doctor(json_out: JsonFlag = False) -> None:
    """Report the toolchain (paths, pinned commit), environments and GPU.

    Example: qwrap doctor --json
    """
    from .doctor import collect, render

    info = collect()
    if json_out:
        typer.echo(json.dumps(info, indent=2))
    else:
        render(info, out_console)


@_command_on_use()
def setup(
    cuda: Annotated[Optional[bool], typer.Option("--cuda/--cpu", help="Build llama.cpp with CUDA (default: when nvidia-smi sees a GPU).")] = None,
    backends: Annotated[list[str], typer.Option(help=f"Backend environments to create too ({', '.join(BACKEND_NAMES)}, or all); repeatable.")] = [],  # noqa: B006
    llama: Annotated[bool, typer.Option(help="Fetch and build the pinned llama.cpp.")] = True,
    envs: Annotated[bool, typer.Option(help="Create the converter and report environments.")] = True,
    archive: Annotated[Optional[Path], typer.Option(help="A local copy of the pinned llama.cpp source archive (still hash-checked).")] = None,
) -> None:
    """Fetch (hash-checked) and build the pinned llama.cpp and create the environments in the cache; what is already there is reused.

    Examples:

      qwrap setup

      qwrap setup --cuda --backends gptqmodel
    """
    from .install import setup as run_setup

    done = run_setup(llama=llama, base_envs=envs, backends=backends, cuda=cuda, archive=archive,
                     say=lambda line: err_console.print(line, highlight=False))
    for what, path in done.items():
        typer.echo(f"{what}\t{path}")


@env_app.command("create")
def env_create(
    name: Annotated[str, typer.Argument(help=f"convert (the GGUF converter), a backend ({', '.join(BACKEND_NAMES)}) or report (the quality plot).")],
    rebuild: Annotated[bool, typer.Option(help="Recreate even if healthy.")] = False,
) -> None:
    """Create (or verify) an isolated environment in the cache. Example: qwrap env create convert"""
    from . import envs

    def show(line: str) -> None:
        if line.startswith(("Collecting", "Installing", "Successfully")):
            err_console.print(f"[dim]{line}[/dim]")

    env = envs.ensure_env(name, on_line=show, rebuild=rebuild)
    typer.echo(str(env.python))


def _crash_log(exc: BaseException) -> Path:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="qwrap-crash-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"qwrap {__version__}\nargv: {sys.argv[1:2]}\n\n")
        traceback.print_exception(exc, file=f)
    return Path(path)


def main_inner(argv: list[str] | None = None) -> int:
    """Run the app; expected errors propagate as QwrapError (testable)."""
    try:
        app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = main_inner(argv)
    except QwrapError as err:
        err_console.print(f"[bold red]error[/bold red] ({err.title}): {err.message}", highlight=False)
        if err.hint:
            err_console.print(f"[bold]hint:[/bold] {err.hint}", highlight=False)
        code = exit_code_for(err)
    except click.exceptions.Abort:
        code = Interrupted.exit_code
    except click.ClickException as err:
        err.show()
        code = err.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        code = Interrupted.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if os.environ.get("QWRAP_DEBUG"):
            raise
        log = _crash_log(exc)
        err_console.print(f"[bold red]internal error[/bold red]: {exc!r}\nDetails: {log}")
        code = exit_code_for(exc)
    sys.exit(code)


if __name__ == "__main__":
    main()
