"""The run's texts: which calibration text and which evaluation text a run uses, decided once
before the plan is built, the same way for `qwrap plan` and `qwrap run` (so both list the same
steps), and the note a run prints when a text is not what the user asked for or is missing."""

from __future__ import annotations

from pathlib import Path

from . import calib_source, evaltext
from .context import Reporter
from .errors import OfflineError
from .evaltext import Evaluation
from .journal import sha256_file
from .model import Calibration, ModelInfo
from .preflight import needs_calibration, wants_calibration
from .request import Request


def calibration(request: Request, token: str | None, *, fetch: bool) -> tuple[Calibration | None, str]:
    """The calibration text: --calib FILE, or WikiText-2 (fetched and turned into text once, in
    the cache, when ``fetch``; `plan` only looks in the cache). A format that only *wants* it
    (GGUF's default importance matrix) goes on without it: then the note says so."""
    required = needs_calibration(request)
    if not required and not wants_calibration(request):
        return None, ""
    if request.calib not in (None, "wikitext2"):
        path = Path(str(request.calib)).resolve()
        return Calibration(f"sha256:{sha256_file(path)}", path.name, str(path)), ""
    identity = f"hf-dataset:{calib_source.WIKITEXT_REPO}/{calib_source.TRAIN_FILE}"
    try:
        if fetch:
            text: Path | None = calib_source.wikitext2_text(token=token)
        else:
            text = calib_source.planned_text()
    except OfflineError as exc:
        if required and fetch:
            raise
        if required:  # plan: report what run would need; run raises with the fix
            return Calibration(identity, "wikitext2", None), ""
        return None, (f"no calibration text ({exc.message}): the low-bit types are quantized without an importance "
                      "matrix. Pass --calib FILE.txt for a better result, or --no-imatrix to silence this.")
    return Calibration(identity, "wikitext2", str(text) if text else None), ""


def evaluation(request: Request, model: ModelInfo, token: str | None, *,
               work: Path | None) -> tuple[Evaluation | None, str]:
    """The evaluation text and chunking (see evaltext.py), and a note when it is not what the
    user asked for or there is none; ``work`` is None for `plan` (which fetches nothing)."""
    if not request.evaluate:
        return None, ""
    chunks = evaltext.chunks_for(request.eval_ctx, request.eval_tokens)  # the default: see sized_evaluation
    if request.eval_text is not None:
        return evaltext.from_file(Path(request.eval_text), request.eval_ctx, chunks), ""
    try:
        return evaltext.wikitext_test(request.eval_ctx, chunks, token=token, fetch=work is not None), ""
    except OfflineError as exc:
        reason = exc.message
    if request.calib not in (None, "wikitext2"):
        ev = evaltext.held_out(Path(str(request.calib)), request.eval_ctx, chunks, work)
        if ev is not None:
            return ev, ev.note
    return None, (f"the artifacts are not measured: no --eval-text, and WikiText-2 (test) is not available "
                  f"({reason}). Pass --eval-text FILE to measure them, or --no-eval to silence this.")


def warn_overlap(request: Request, ev: Evaluation | None, reporter: Reporter) -> None:
    """Never evaluate on text calibration used: say so loudly when the two share documents."""
    if ev is None or ev.path is None or request.calib in (None, "wikitext2") or "held-out" in ev.label:
        return
    shared = evaltext.overlap(Path(ev.path), Path(str(request.calib)))
    if shared:
        reporter.warning(f"{shared} document(s) of the evaluation text {ev.label} are also calibration text: "
                         "the quality figures will look better than they are. Pass another --eval-text.")
