"""``python -m qwrap.workers.quality_plot INPUT.json OUTPUT.png``: the quality plot of a run.

Runs in the report environment (matplotlib, Agg backend, no torch). INPUT.json is what
``qualitypage.py`` writes::

    {"points": [{"label": "Q4_K_M", "format": "gguf", "bytes": 807694336, "kld_mean": 0.0213,
                 "kld_mean_se": 0.0004}, ...],   # the standard error is optional
     "reference_bytes": 2471645184,   # the 16-bit size, or null
     "title": "Llama-3.2-1B: KL divergence against size"}

The plot: mean KL divergence (log scale) against file size (MiB or GiB, the units of the
result tables), every point labelled, one standard error either side as an error bar where
the point has one, the Pareto front (the points no smaller-or-equal file
beats or equals in KLD) as a line, the 16-bit size as a vertical line, a legend by format.
Deterministic: fixed figure size and dpi, fixed colours and markers by sorted format name, no
timestamp in the file. Written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

FIGSIZE = (9.0, 5.5)  # inches: 1080 x 660 pixels at DPI
DPI = 120
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
# Label positions tried in turn (offset in points, horizontal and vertical alignment).
PLACES = (
    ((7, 4), "left", "bottom"), ((7, -4), "left", "top"), ((-7, 4), "right", "bottom"),
    ((-7, -4), "right", "top"), ((0, 9), "center", "bottom"), ((0, -9), "center", "top"),
    ((9, 14), "left", "bottom"), ((9, -14), "left", "top"), ((-9, 14), "right", "bottom"),
    ((-9, -14), "right", "top"),
)


class BadInput(ValueError):
    """INPUT.json does not describe a plot."""


def load(path: Path) -> tuple[list[dict[str, Any]], int | None, str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise BadInput(f"{path}: expected an object with a list of points")
    points: list[dict[str, Any]] = []
    for i, p in enumerate(doc["points"]):
        ok = (isinstance(p, dict) and isinstance(p.get("label"), str) and isinstance(p.get("format"), str)
              and isinstance(p.get("bytes"), int) and p["bytes"] > 0
              and isinstance(p.get("kld_mean"), (int, float)) and math.isfinite(p["kld_mean"]))
        if not ok:
            raise BadInput(f"{path}: point {i} needs label, format, bytes > 0 and a finite kld_mean: {p!r}")
        se = p.get("kld_mean_se")
        if se is not None and not (isinstance(se, (int, float)) and not isinstance(se, bool) and math.isfinite(se)
                                   and se >= 0):
            raise BadInput(f"{path}: point {i}'s kld_mean_se must be a finite number >= 0 or absent: {se!r}")
        points.append(p)
    if not points:
        raise BadInput(f"{path}: no points to plot")
    ref = doc.get("reference_bytes")
    if ref is not None and not (isinstance(ref, int) and ref > 0):
        raise BadInput(f"{path}: reference_bytes must be a positive integer or null, not {ref!r}")
    return points, ref, str(doc.get("title") or "")


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points with a lower KLD than every smaller-or-equal file: the lowest KLD for their size."""
    front: list[dict[str, Any]] = []
    best = math.inf
    for p in sorted(points, key=lambda p: (p["bytes"], p["kld_mean"], p["label"])):
        if p["kld_mean"] < best:
            front.append(p)
            best = p["kld_mean"]
    return front


def unit_for(largest: float) -> tuple[str, float]:
    return ("GiB", 1024.0**3) if largest >= 1024.0**3 else ("MiB", 1024.0**2)


def _size(n: float, unit: str, scale: float) -> str:
    return f"{n / scale:.1f} {unit}"  # as the tables write sizes (units.human_bytes)


def draw(points: list[dict[str, Any]], reference: int | None, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9.5})
    largest = max([p["bytes"] for p in points] + ([reference] if reference else []))
    unit, scale = unit_for(largest)
    positive = [p["kld_mean"] for p in points if p["kld_mean"] > 0]
    floor = (min(positive) / 3.0) if positive else 1e-6  # where a KLD of 0 is drawn on the log axis

    def y(p: dict[str, Any]) -> float:
        return float(p["kld_mean"]) if p["kld_mean"] > 0 else floor

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.set_yscale("log")
    def bar(p: dict[str, Any]) -> tuple[float, float]:
        """How far the error bar reaches below and above the point (one standard error, kept
        above the log axis' floor)."""
        se = float(p.get("kld_mean_se") or 0.0)
        return min(se, y(p) - floor / 2.0), se

    ax.set_xlim(0, largest / scale * 1.1)
    ax.set_ylim(min(y(p) - bar(p)[0] for p in points) / 2.5, max(y(p) + bar(p)[1] for p in points) * 2.5)
    ax.grid(True, which="major", color="0.88", linewidth=0.8)
    ax.grid(True, which="minor", axis="y", color="0.95", linewidth=0.5)
    ax.set_axisbelow(True)

    front = pareto(points)
    if len(front) > 1:
        ax.plot([p["bytes"] / scale for p in front], [y(p) for p in front], color="0.35", linewidth=1.4,
                linestyle="-", zorder=2, label="Pareto front (lowest KLD for its size)")
    elif front:
        ax.plot([], [], color="0.35", linewidth=1.4, label="Pareto front (lowest KLD for its size)")
    on_front = {id(p) for p in front}

    for i, fmt in enumerate(sorted({p["format"] for p in points})):
        mine = [p for p in points if p["format"] == fmt]
        colour, marker = COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]
        barred = [p for p in mine if p.get("kld_mean_se")]
        if barred:
            ax.errorbar([p["bytes"] / scale for p in barred], [y(p) for p in barred],
                        yerr=[[bar(p)[0] for p in barred], [bar(p)[1] for p in barred]], fmt="none",
                        ecolor=colour, elinewidth=1.0, capsize=3, zorder=2.5)
        ax.scatter([p["bytes"] / scale for p in mine], [y(p) for p in mine], s=46, color=colour,
                   marker=marker, edgecolors=["black" if id(p) in on_front else colour for p in mine],
                   linewidths=1.1, zorder=3, label=fmt.upper())

    if reference:
        ax.axvline(reference / scale, color="0.45", linestyle="--", linewidth=1.2, zorder=1,
                   label=f"16-bit size ({_size(reference, unit, scale)})")

    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel("mean KL divergence vs. the unquantized model (log scale)")
    if title:
        ax.set_title(title, fontsize=11)
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.95)
    fig.tight_layout()
    _place_labels(fig, ax, points, scale, y)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _place_labels(fig: Any, ax: Any, points: list[dict[str, Any]], scale: float, y: Any) -> None:
    """Label every point, each at the first nearby place that overlaps no other label, no
    marker and the legend, and stays inside the axes (else at the first place)."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = [ax.get_legend().get_window_extent(renderer)]
    marks = []
    for p in points:
        px, py = ax.transData.transform((p["bytes"] / scale, y(p)))
        marks.append((px - 5, py - 5, px + 5, py + 5))

    def clear(box: Any) -> bool:
        if box.x0 < inside.x0 or box.x1 > inside.x1 or box.y0 < inside.y0 or box.y1 > inside.y1:
            return False
        if any(box.overlaps(t) for t in taken):
            return False
        return not any(box.x0 < m[2] and box.x1 > m[0] and box.y0 < m[3] and box.y1 > m[1] for m in marks)

    for p in sorted(points, key=lambda p: (p["bytes"], p["kld_mean"], p["label"])):
        text = p["label"] + (" (KLD 0)" if p["kld_mean"] <= 0 else "")
        note = None
        for offset, ha, va in PLACES:
            if note is not None:
                note.remove()
            note = ax.annotate(text, (p["bytes"] / scale, y(p)), xytext=offset, textcoords="offset points",
                               ha=ha, va=va, fontsize=8.5, zorder=4)
            box = note.get_window_extent(renderer)
            if clear(box):
                break
        else:
            if note is not None:
                note.remove()
            offset, ha, va = PLACES[0]
            note = ax.annotate(text, (p["bytes"] / scale, y(p)), xytext=offset, textcoords="offset points",
                               ha=ha, va=va, fontsize=8.5, zorder=4)
            box = note.get_window_extent(renderer)
        taken.append(box)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m qwrap.workers.quality_plot INPUT.json OUTPUT.png", file=sys.stderr)
        return 2
    try:
        points, reference, title = load(Path(argv[0]))
    except BadInput as exc:
        print(f"quality_plot: {exc}", file=sys.stderr)
        return 2
    out = Path(argv[1])
    draw(points, reference, title, out)
    print(f"wrote {out} ({len(points)} points, {len(pareto(points))} on the Pareto front)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
