"""The quality page of a run: ``OUT/quality.png`` and ``OUT/quality.html``.

Written from the run result when at least one artifact has a measured mean KL divergence. The
plot (KLD against size, the Pareto front, the 16-bit size) is drawn by
``workers/quality_plot.py`` in the report environment (matplotlib; this process never imports
it); the page is one self-contained file: inline CSS, the plot embedded as a data URI, a table
of every artifact and the evaluation it was measured on, nothing loaded from anywhere else.
Without the report environment the page is still written, without the plot, and the reason
comes back to the caller (``Written.note``): a missing plot never fails a run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

from . import envs
from .children import run_checked
from .errors import Interrupted, QwrapError, ToolchainMissingError
from .quality import NOISE_SIGMAS, columns, figure, noise_neighbours
from .results import BUDGET_COLUMNS, COVERAGE_COLUMNS, Artifact, RunResult, budget_rows, labels
from .units import human_bytes

PNG_NAME = "quality.png"
HTML_NAME = "quality.html"
PLOT_TIMEOUT_S = 300.0


class Written(list[Path]):
    """The paths written; ``note`` says in one line why the plot is missing, when it is."""

    note: str | None = None


def _kld(a: Artifact) -> float | None:
    value = a.kld_mean
    return value if value is not None and math.isfinite(value) else None


def plot_input(result: RunResult, reference_bytes: int | None) -> dict[str, Any]:
    """The plot worker's INPUT.json: the measured artifacts with a size (and the standard error
    of each mean KLD, where it was recorded: the plot's error bars)."""
    points = [{"label": label, "format": a.format, "bytes": a.bytes, "kld_mean": kld,
               **({"kld_mean_se": se} if (se := a.quality.kld_mean_se if a.quality else None) is not None else {})}
              for a, label in zip(result.artifacts, labels(result.artifacts), strict=True)
              if (kld := _kld(a)) is not None and isinstance(a.bytes, int) and a.bytes > 0]
    return {"points": points, "reference_bytes": reference_bytes,
            "title": f"{result.model.name}: KL divergence against file size"}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _draw(output: Path, doc: dict[str, Any]) -> tuple[Path | None, str | None]:
    """Run the plot worker; (the PNG, None) or (None, why not)."""
    try:
        env = envs.find_env("report")
    except ToolchainMissingError as exc:
        return None, f"quality plot skipped: {exc.message}; {exc.hint or ''}".strip()
    checkpoint = output / ".checkpoint"
    jobs = checkpoint / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = jobs / "quality-plot.json"
    _atomic_write(job, json.dumps(doc, indent=1).encode())
    png = output / PNG_NAME
    log = checkpoint / "logs" / "quality-plot.log"
    argv: list[str | os.PathLike[str]] = [env.python, "-m", "qwrap.workers.quality_plot", job, png]
    child_env: dict[str, str | None] = {
        "PYTHONPATH": str(envs.worker_code()), "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
        # matplotlib's font cache, kept with the matplotlib it belongs to (not in $HOME)
        "MPLCONFIGDIR": str(env.path / "mplconfig"),
    }
    try:
        run_checked(argv, what="the quality plot", log_path=log, env=child_env, timeout=PLOT_TIMEOUT_S)
    except Interrupted:
        raise
    except QwrapError as exc:
        return None, f"quality plot failed: {exc.message} (log: {log})"
    return png, None


# -- the page ---------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 2rem auto; max-width: 1100px; padding: 0 1.25rem; color: #1b1f24; background: #fff; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
p.sub { color: #57606a; margin: 0 0 1.25rem; }
p.ref { background: #f6f8fa; border-left: 4px solid #8c959f; padding: .6rem .9rem; margin: 1rem 0; }
p.note { background: #fff8c5; border-left: 4px solid #d4a72c; padding: .6rem .9rem; }
figure { margin: 1rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .9rem; margin-top: .3rem; }
div.table { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; }
th, td { padding: .32rem .4rem; border-bottom: 1px solid #d0d7de; text-align: left; white-space: nowrap; }
td.file { white-space: normal; overflow-wrap: anywhere; min-width: 9rem; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.failed { color: #cf222e; font-weight: 600; }
td.passed { color: #1a7f37; }
td.none { color: #8c959f; }
span.noise { color: #9a6700; font-size: .8rem; margin-left: .3rem; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; }
"""

def _num(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return fmt.format(value)


def _noise_mark(neighbours: list[str]) -> str:
    """The mark after a mean KLD the evaluation cannot tell from others': ≈ and their labels."""
    if not neighbours:
        return ""
    names = html.escape(", ".join(neighbours))
    return (f' <span class="noise" title="within noise of {names}: the difference is less than '
            f'{NOISE_SIGMAS:g} combined standard errors">≈ {names}</span>')


def _row(a: Artifact, output: Path, neighbours: list[str] | None = None) -> str:
    try:
        rel = os.path.relpath(a.path, output)
    except ValueError:
        rel = a.path
    q = a.quality
    mark = _noise_mark(neighbours or [])
    cells = [
        ("file", f"<code>{html.escape(rel)}</code>"),
        ("", html.escape(a.format.upper())),
        ("", html.escape(str(a.quant or "–"))),
        ("num", html.escape(human_bytes(a.bytes))),
        ("num", _num(a.bits_per_weight, "{:.2f}")),
        *(("num", html.escape(f.text(q, "–")) + (mark if f.key == "kld_mean" else "")) for f in columns("page")),
        ("" if q else "none", html.escape(str(q.runtime or "–")) if q else "not measured"),
        (html.escape(a.gate) if a.gate in ("passed", "failed") else "none",
         html.escape(a.gate) if a.gate else "no limit"),
    ]
    return "<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for c, v in cells) + "</tr>"


def _reference(result: RunResult) -> str:
    ref = result.quality_reference
    if ref is None:
        return ""
    parts = [f"Evaluation text: <b>{html.escape(ref.text)}</b>"]
    if ref.text_identity:
        parts.append(f"(<code>{html.escape(ref.text_identity)}</code>)")
    details = [f"{ref.tokens_scored:,} tokens scored", f"{ref.chunks} chunks", f"ctx {ref.ctx}"]
    if ref.ppl_base is not None:
        se = _base_se(result)
        details.append("PPL of the 16-bit model " + _num(ref.ppl_base, "{:.2f}")
                       + (f" ± {figure('ppl_base').se_text(se)}" if se is not None else ""))
    text = " ".join(parts) + ": " + html.escape(", ".join(details)) + "."
    if ref.note:
        text += " " + html.escape(ref.note)
    return f'<p class="ref">{text}</p>'


def _base_se(result: RunResult) -> float | None:
    """The standard error of the 16-bit model's PPL: llama-perplexity prints it with every
    --kl-divergence summary (the same reference logits on the same tokens), so a llama.cpp row has it."""
    base = figure("ppl_base")
    return next((se for a in result.artifacts if (q := a.quality) is not None and q.runtime == "llama.cpp"
                 and (se := base.se(q)) is not None), None)


def _errors_note(result: RunResult, neighbours: dict[str, list[str]]) -> str:
    """What the ± and the ≈ in the table mean, when the table has any."""
    measured = [a.quality for a in result.artifacts if a.quality is not None]
    if not any(f.se(q) is not None for q in measured for f in columns("page")):
        return ""
    text = ("Each figure is its mean ± its standard error over the scored tokens, as llama-perplexity computes "
            "it (the KLD p99 has none).")
    if neighbours:
        text += (f" ≈ marks a mean KLD within noise of another file's: the two differ by less than "
                 f"{NOISE_SIGMAS:g} combined standard errors, so this evaluation cannot rank them (more "
                 "--eval-tokens can).")
    return f'<p class="sub">{html.escape(text)}</p>'


def _budgets(result: RunResult) -> str:
    """Each size budget's file beside the stock type nearest its size, measured on the same tokens."""
    rows = budget_rows(result)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in BUDGET_COLUMNS)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    why = "".join(f"<li><code>{html.escape(a.quant or '')}</code>: {html.escape(a.budget.reason)}</li>"
                  for a in result.artifacts if a.budget is not None)
    return (f'<h2>Size budgets</h2>\n<div class="table"><table id="budgets">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody>\n</table></div>\n<ul class=\"sub\">{why}</ul>")


def _coverage(result: RunResult) -> str:
    if not result.expert_coverages:
        return ""
    head = "".join(f"<th>{html.escape(x)}</th>" for x in COVERAGE_COLUMNS)
    tables = []
    for i, c in enumerate(result.expert_coverages):
        body = "\n".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in c.rows())
        tables.append(f"<p class=\"sub\">{html.escape(c.label)}: {html.escape(c.summary)}.</p>\n<div class=\"table\">"
                      f"<table id=\"coverage{'' if i == 0 else f'-{i + 1}'}\">\n<thead><tr>{head}</tr></thead>"
                      f"\n<tbody>\n{body}\n</tbody>\n</table></div>")
    return "<h2>Expert coverage</h2>\n" + "\n".join(tables)


def _projector(result: RunResult) -> str:
    """A vision model's projector: not measured here (the figures are the text model's)."""
    p = result.projector
    if p is None:
        return ""
    name = html.escape(os.path.relpath(p.path, result.output))
    return (f"<p class=\"sub\">Vision projector: <code>{name}</code> ({html.escape(p.type)}, "
            f"{html.escape(human_bytes(p.bytes))}), loaded with <code>{html.escape(p.validated_with)}</code> in "
            "llama-mtmd-cli on an image; the figures above are the text model's.</p>")


def header() -> tuple[str, ...]:
    """The table's columns: the file's, then the figures of the column spec (quality.FIGURES)."""
    return ("file", "format", "type", "size", "bits/weight", *(f.title for f in columns("page")), "runtime", "gate")


def render(result: RunResult, output: Path, png: bytes | None, *, reference_bytes: int | None,
           note: str | None = None) -> str:
    model = html.escape(result.model.name)
    version = html.escape(result.qwrap_version)
    commit = html.escape(result.llama_cpp_commit[:12])
    runtimes = sorted({q.runtime for a in result.artifacts if (q := a.quality) is not None and q.runtime})
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        ref16 = f" The dashed line is the 16-bit size ({html.escape(human_bytes(reference_bytes))})." \
            if reference_bytes else ""
        bars = "; the bars span one standard error either side" \
            if any(a.quality is not None and a.quality.kld_mean_se for a in result.artifacts) else ""
        plot = (f'<figure><img alt="mean KL divergence against file size" src="data:image/png;base64,{data}">'
                "<figcaption>Mean KL divergence of each file's next-token distribution against the unquantized "
                f"model (log scale), against its size{bars}. The line is the Pareto front: the files no smaller "
                f"file beats.{ref16}</figcaption></figure>")
    else:
        plot = f'<p class="note">{html.escape(note or "quality plot not drawn")}</p>'
    mixed = ("<p class=\"note\">These figures come from different runtimes ("
             + html.escape(", ".join(runtimes)) + "): each runtime scores its own evaluation tokens, so compare "
             "KLD within a runtime.</p>") if len(runtimes) > 1 else ""
    names = labels(result.artifacts)
    neighbours = noise_neighbours(list(zip(names, (a.quality for a in result.artifacts), strict=True)))
    rows = "\n".join(_row(a, output, neighbours.get(name)) for a, name in zip(result.artifacts, names, strict=True))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{model}: quantization quality</title>
<style>{CSS}</style>
</head>
<body>
<h1>{model}: quantization quality</h1>
<p class="sub">qwrap {version}, llama.cpp <code>{commit}</code></p>
{_reference(result)}
{plot}
{mixed}
<div class="table"><table id="artifacts">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody>
</table></div>
{_errors_note(result, neighbours)}
{_projector(result)}
{_budgets(result)}
{_coverage(result)}
</body>
</html>
"""


def write(output: Path, result: RunResult, *, reference_bytes: int | None) -> Written:
    """Write ``OUT/quality.png`` (when the report environment exists) and ``OUT/quality.html``
    if any artifact has a measured mean KLD; return the paths written (a ``Written``, whose
    ``note`` says why the plot is missing, if it is)."""
    written = Written()
    if not any(_kld(a) is not None for a in result.artifacts):
        return written
    doc = plot_input(result, reference_bytes)
    if doc["points"]:
        png_path, written.note = _draw(output, doc)
    else:
        png_path, written.note = None, "quality plot skipped: no measured artifact has a recorded size"
    png = png_path.read_bytes() if png_path is not None else None
    if png_path is not None:
        written.append(png_path)
    page = output / HTML_NAME
    _atomic_write(page, render(result, output, png, reference_bytes=reference_bytes, note=written.note).encode())
    written.append(page)
    return written
