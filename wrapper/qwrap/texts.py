"""The run's texts: which calibration text and which evaluation text a run uses, decided once
before the plan is built, the same way for `qwrap plan`, `qwrap run` and every `--step` job
(so all list the same steps), and the note a run prints when a text is not what the user asked
for or is missing.

The default texts are WikiText-2's splits: available when cached here or when the Hub answers
(``calib_source.unavailable``, which asks the Hub at most once per process, within ~2 s). When
both defaults are missing for that one cause, ``warning_lines`` makes their two notes one line.
"""

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


class Note(str):
    """A note as it is printed (a plain string for the card and the journal) that keeps its
    parts, so that notes with one cause print as one line (``warning_lines``)."""

    cause: str  # why the text is missing
    instead: str  # what the run does without it
    fix: str  # the option that gives it ("--calib FILE.txt for a better result")
    silence: str  # the option that says "without it" on purpose ("--no-imatrix")

    def __new__(cls, cause: str, instead: str, fix: str, silence: str) -> Note:
        note = super().__new__(cls, f"{cause}: {instead}. Pass {fix}, or {silence} to silence this.")
        note.cause, note.instead, note.fix, note.silence = cause, instead, fix, silence
        return note

    def __reduce__(self) -> tuple[type[Note], tuple[str, str, str, str]]:
        # copy/pickle (dataclasses.asdict deep-copies a result) rebuild it from its parts
        return Note, (self.cause, self.instead, self.fix, self.silence)

    def joined(self, other: Note) -> Note:
        return Note(self.cause, f"{self.instead}, and {other.instead}", f"{self.fix} and {other.fix}",
                    f"{self.silence} and {other.silence}")


def calibration(request: Request, token: str | None, *, fetch: bool) -> tuple[Calibration | None, str]:
    """The calibration text: --calib FILE, or WikiText-2 (train), fetched and turned into text
    once, in the cache, when ``fetch``; `plan` only looks in the cache. Returns the text, or
    None and a note (a ``Note``) when a format only *wants* it (GGUF's default importance
    matrix) and it cannot be had: the run goes on without it. A format that needs it, or an
    explicit ``--calib wikitext2``, makes the run stop (OfflineError); `plan` lists the steps
    that run would then need."""
    if not needs_calibration(request) and not wants_calibration(request):
        return None, ""
    if request.calib not in (None, "wikitext2"):
        path = Path(str(request.calib)).resolve()
        return Calibration(f"sha256:{sha256_file(path)}", path.name, str(path)), ""
    required = needs_calibration(request) or request.calib == "wikitext2"
    identity = f"hf-dataset:{calib_source.WIKITEXT_REPO}/{calib_source.TRAIN_FILE}"
    why = calib_source.unavailable("train")
    if why and not (required and fetch):
        return (Calibration(identity, "wikitext2", None), "") if required else (None, _no_calibration(why))
    try:
        text = calib_source.wikitext2_text(token=token) if fetch else calib_source.cached_text()
    except OfflineError as exc:  # the Hub answered, the download failed (or it was never there)
        if required:
            raise
        return None, _no_calibration(exc.message)
    return Calibration(identity, "wikitext2", str(text) if text else None), ""


def _no_calibration(why: str) -> Note:
    return Note(why, "no calibration text, so the low-bit types are quantized without an importance matrix",
                "--calib FILE.txt for a better result", "--no-imatrix")


def evaluation(request: Request, model: ModelInfo, token: str | None, *,
               work: Path | None) -> tuple[Evaluation | None, str]:
    """The evaluation text and chunking (see evaltext.py), and a note when it is not what the
    user asked for or there is none; ``work`` is None for `plan` (which fetches nothing)."""
    if not request.evaluate:
        return None, ""
    chunks = evaltext.chunks_for(request.eval_ctx, request.eval_tokens)  # the default: see sized_evaluation
    if request.eval_text is not None:
        return evaltext.from_file(Path(request.eval_text), request.eval_ctx, chunks), ""
    why = calib_source.unavailable("test")
    if not why:
        try:
            return evaltext.wikitext_test(request.eval_ctx, chunks, token=token, fetch=work is not None), ""
        except OfflineError as exc:
            why = exc.message
    if request.calib not in (None, "wikitext2"):
        ev = evaltext.held_out(Path(str(request.calib)), request.eval_ctx, chunks, work)
        if ev is not None:
            return ev, ev.note
    return None, Note(why, "the artifacts are not measured (no --eval-text)", "--eval-text FILE to measure them",
                      "--no-eval")


def warning_lines(*notes: str) -> list[str]:
    """The notes to print, each once; notes with one cause (the calibration's and the
    evaluation's when WikiText-2 cannot be had) joined into one line."""
    lines: dict[str, str] = {}
    for note in notes:
        if not note:
            continue
        key = note.cause if isinstance(note, Note) else note
        seen = lines.get(key)
        lines[key] = seen.joined(note) if isinstance(seen, Note) and isinstance(note, Note) else note
    return list(lines.values())


def warn_overlap(request: Request, ev: Evaluation | None, reporter: Reporter) -> None:
    """Never evaluate on text calibration used: say so loudly when the two share documents."""
    if ev is None or ev.path is None or request.calib in (None, "wikitext2") or "held-out" in ev.label:
        return
    shared = evaltext.overlap(Path(ev.path), Path(str(request.calib)))
    if shared:
        reporter.warning(f"{shared} document(s) of the evaluation text {ev.label} are also calibration text: "
                         "the quality figures will look better than they are. Pass another --eval-text.")
