"""The typer app: options -> Request, results -> terminal. No logic lives here.

``main()`` prints expected errors (message + hint, exit code from errors.py) and writes
unexpected ones to a crash log; tracebacks on screen only with QWRAP_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import Interrupted, QwrapError, exit_code_for

app = typer.Typer(
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

Model = Annotated[str, typer.Argument(help="Local Hugging Face model folder, or a Hub id `org/name`.")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output folder (created if missing).")]
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


def run(
    model: Model,
    output: Output = Path("qwrap-out"),
    format: Annotated[list[str], typer.Option("--format", "-f", help="gguf, awq or gptq; repeatable (one download, one calibration set).")] = ["gguf"],  # noqa: B006
    quant: Annotated[list[str], typer.Option("--quant", "-q", help="GGUF type, repeatable, case-insensitive (see `qwrap formats`).")] = ["Q4_K_M"],  # noqa: B006
    revision: Annotated[Optional[str], typer.Option(help="Hub branch, tag or commit.")] = None,
    token: Annotated[Optional[str], typer.Option(help="Hub token (default: HF_TOKEN or the stored login). Never logged.")] = None,
    outtype: Annotated[str, typer.Option(help="GGUF 16-bit intermediate: auto (bf16 if the weights are bf16, else f16), f16, bf16, f32.")] = "auto",
    imatrix: Annotated[Optional[str], typer.Option(help="GGUF importance matrix FILE, or `auto` to compute it from --calib.")] = None,
    calib: Annotated[Optional[str], typer.Option(help="Calibration text FILE (.txt or .jsonl); default: WikiText-2 from the Hub.")] = None,
    bits: Annotated[int, typer.Option(help="AWQ/GPTQ bits (AWQ: 4; GPTQ: 2, 3, 4 or 8).")] = 4,
    group_size: Annotated[int, typer.Option(help="AWQ/GPTQ group size; must divide the layer widths.")] = 128,
    awq_version: Annotated[str, typer.Option(help="AWQ kernel layout: gemm or gemv.")] = "gemm",
    zero_point: Annotated[bool, typer.Option(help="AWQ asymmetric quantization with zero points.")] = True,
    act_order: Annotated[bool, typer.Option(help="GPTQ: quantize columns in order of activation size.")] = False,
    sym: Annotated[bool, typer.Option(help="GPTQ symmetric quantization.")] = True,
    damp: Annotated[float, typer.Option(help="GPTQ dampening fraction.")] = 0.01,
    backend: Annotated[list[str], typer.Option(help="autoawq or gptqmodel for AWQ; gptqmodel or auto-gptq for GPTQ; FORMAT=NAME to be explicit. Repeatable.")] = [],  # noqa: B006
    calib_samples: Annotated[int, typer.Option(help="AWQ/GPTQ calibration samples.")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="AWQ/GPTQ calibration sequence length (tokens).")] = 512,
    device: Annotated[str, typer.Option(help="AWQ/GPTQ device: auto (CUDA when present), cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="Threads for llama.cpp tools and AWQ/GPTQ workers (0: all cores).")] = 0,
    stall_timeout: Annotated[float, typer.Option(help="Kill a tool that prints nothing for this many seconds.")] = 600.0,
    keep_intermediate: Annotated[bool, typer.Option(help="Keep the 16-bit GGUF and AWQ/GPTQ layer checkpoints in OUT/.checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite existing artifacts.")] = False,
    preflight: Annotated[bool, typer.Option(help="Check architecture and free disk before starting.")] = True,
    json_out: JsonFlag = False,
    events: Events = None,
) -> None:
    """Quantize MODEL into OUTPUT; rerun the same command to resume after any interruption.

    Examples:

      qwrap run ./Llama-3.2-1B -q Q4_K_M -q Q8_0 -o out/

      qwrap run meta-llama/Llama-3.2-1B --revision main -q IQ3_XXS --imatrix auto --calib wiki.txt -o out/ --json

      qwrap run org/name --format gguf --format awq --format gptq --calib data.txt -o out/
    """
    options = dict(locals())
    _execute(_request(options), token=token, json_out=json_out, events=events)


@app.command("plan")
@functools.wraps(run)
def plan(**options: Any) -> None:
    """Show what `qwrap run` with the same options would do: steps, expected sizes, peak disk
    and memory, and the checks (architecture, disk, quant types, toolchain) - without heavy work.

    Examples:

      qwrap plan ./Llama-3.2-1B -q Q4_K_M -q Q8_0 -o out/

      qwrap plan meta-llama/Llama-3.2-1B -q Q4_K_M --json   (downloads no weights)
    """
    from . import pipeline

    report = pipeline.plan_only(_request(options), token=options["token"])
    if options["json_out"]:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        from .report import render_plan

        render_plan(report.to_json(), out_console)


app.command()(run)


def _request(o: dict[str, Any]) -> Any:
    from .request import QuantOptions, Request, backends_from

    model = o["model"]
    if Path(model).exists():
        model = str(Path(model).resolve())  # the journal must work from any directory
    awq_backend, gptq_backend = backends_from(o["backend"], o["format"])
    return Request(
        model=model, output=Path(o["output"]).resolve(), formats=tuple(o["format"]), quants=tuple(o["quant"]),
        revision=o["revision"], outtype=o["outtype"], imatrix=o["imatrix"], calib=o["calib"], force=o["force"],
        keep_intermediate=o["keep_intermediate"], threads=o["threads"], stall_timeout=o["stall_timeout"],
        preflight=o["preflight"],
        quant_options=QuantOptions(
            bits=o["bits"], group_size=o["group_size"], awq_version=o["awq_version"], zero_point=o["zero_point"],
            act_order=o["act_order"], sym=o["sym"], damp=o["damp"], awq_backend=awq_backend,
            gptq_backend=gptq_backend, calib_samples=o["calib_samples"], calib_seq_len=o["calib_seq_len"],
            device=o["device"],
        ),
    )


def _execute(request: Any, *, token: str | None, json_out: bool, events: str | None) -> None:
    """Run with live progress (and an NDJSON event stream), then print the result."""
    from . import pipeline
    from .errors import UsageError, exit_code_for
    from .events import EventStream
    from .report import build_result, render_table

    if events == "-" and json_out:
        raise UsageError("--events - and --json both want stdout", hint="Write events to a file.")
    with _reporter() as inner:
        stream = EventStream(events, inner) if events else None
        if stream is not None:
            stream.emit("run_started", model=request.model, output=str(request.output),
                        formats=list(request.formats))
        try:
            outcome = pipeline.execute(request, token=token, reporter=stream or inner)
        except BaseException as exc:
            if stream is not None:
                stream.emit("run_finished", exit_code=exit_code_for(exc), error=str(exc))
                stream.close()
            raise
        result = build_result(outcome)
        if stream is not None:
            stream.emit("run_finished", exit_code=0, artifacts=[a["path"] for a in result["artifacts"]])
            stream.close()
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    elif events != "-":
        render_table(result, out_console)


@app.command()
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


@app.command()
def status(output: OutDir, json_out: JsonFlag = False) -> None:
    """Show every step recorded in OUTPUT's journal: state, duration, peak memory, output, error.

    Example: qwrap status out/ --json
    """
    from .status import collect, render

    info = collect(output.resolve())
    if json_out:
        typer.echo(json.dumps(info, indent=2))
    else:
        render(info, out_console)


@app.command()
def formats(
    architectures: Annotated[bool, typer.Option("--architectures", help="List the model architectures the pinned converter supports.")] = False,
) -> None:
    """List the GGUF quant types with bits per weight and whether they need --imatrix.

    Example: qwrap formats --architectures
    """
    from rich.table import Table

    from .formats.gguf import ALIASES, QUANT_TYPES

    if architectures:
        from .toolchain import supported_architectures

        for name in sorted(supported_architectures()):
            typer.echo(name)
        return

    table = Table(title="GGUF quant types (case-insensitive)")
    for col in ("type", "bits/weight", "needs imatrix", "notes"):
        table.add_column(col)
    for q in QUANT_TYPES.values():
        table.add_row(q.name, f"{q.bpw:.2f}", "yes" if q.needs_imatrix else "", q.note)
    out_console.print(table)
    out_console.print("Aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()))


@app.command()
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


@env_app.command("create")
def env_create(
    name: Annotated[str, typer.Argument(help="convert, autoawq, gptqmodel or auto-gptq.")],
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
    import click

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
