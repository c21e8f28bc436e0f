"""The validated run request: what the user asked for, as one immutable value.

Run-level settings live here; each format's own option values (a frozen dataclass the format
defines) are carried in ``format_options`` by format name, so this module names no format.
The token is deliberately not part of it: a request is written to the journal and the JSON
result, and a token must never be.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Request:
    model: str
    output: Path
    formats: tuple[str, ...]
    format_options: tuple[tuple[str, Any], ...] = ()  # (format name, its options value)
    revision: str | None = None
    calib: str | None = None  # a text file, "wikitext2", or None (= wikitext2 when needed)
    force: bool = False
    keep_intermediate: bool = False
    threads: int = 0  # 0: chosen by the runner from --jobs and the steps running at once
    jobs: int = 0  # CPU cores the run may keep busy; 0: all usable cores
    stall_timeout: float | None = 600.0
    preflight: bool = True
    evaluate: bool = True  # measure every artifact against its source (--no-eval: off)
    eval_text: str | None = None  # a text file; None: WikiText-2 (test), offline the calibration's held-out part
    eval_tokens: int = 0  # tokens evaluated (chunks x ctx); 0: sized to the run (pipeline.sized_evaluation)
    eval_ctx: int = 512
    max_kld: tuple[str, ...] = ()  # quality gates: "VALUE" or "NAME=VALUE"
    base_model: str | None = None  # the model card's base_model (a Hub id) when the source is a local folder

    def options(self, fmt: str) -> Any:
        return dict(self.format_options)[fmt]

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "format_options"}
        data["output"] = str(self.output)
        data["formats"] = list(self.formats)
        data["format_options"] = {name: dataclasses.asdict(o) for name, o in self.format_options}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        from .formats import FORMATS

        data = dict(data)
        if "format_options" not in data:
            raise UsageError("the journal's request was written by an older qwrap that recorded options differently",
                             hint="Run `qwrap run` with the same options instead: finished steps are re-verified "
                             "and whatever still matches is reused.")
        formats = tuple(data.get("formats", ()))
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise UsageError(f"the journal asks for formats this qwrap does not have: {', '.join(unknown)}")
        saved = data.get("format_options", {})
        data["format_options"] = tuple((f, FORMATS[f].options_from_json(saved.get(f, {}))) for f in formats)
        data["max_kld"] = tuple(data.get("max_kld", ()))
        data["output"] = Path(data["output"])
        data["formats"] = formats
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_basic(request: Request) -> None:
    """Checks that need no format knowledge."""
    if not request.formats:
        raise UsageError("no format given", hint="Pass --format gguf (repeatable).")
    if request.threads < 0:
        raise UsageError("--threads must be 0 (chosen per step) or a positive number")
    if request.jobs < 0:
        raise UsageError("--jobs must be 0 (all cores) or a positive number")
    if request.stall_timeout is not None and request.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be positive")
    from .evaltext import check_options
    from .quality import parse_gates

    check_options(request.eval_ctx, request.eval_tokens, request.eval_text)
    parse_gates(request.max_kld)
    if request.calib not in (None, "wikitext2") and not Path(request.calib).is_file():
        raise UsageError(f"--calib file {request.calib} does not exist",
                         hint="Pass a plain text (.txt) or JSON-lines (.jsonl) file, or leave --calib out for WikiText-2.")


def safe_argv() -> list[str]:
    """Our command line with any token value removed (for the journal and the model card)."""
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


def backends_from(values: list[str], formats: tuple[str, ...]) -> dict[str, str]:
    """``--backend`` values -> {format: backend}. A bare name goes to every requested format
    that knows it; ``FORMAT=NAME`` is explicit."""
    from .formats import FORMATS

    chosen: dict[str, str] = {}
    for value in values:
        fmt, _, name = value.rpartition("=")
        targets = [fmt] if fmt else [f for f in formats if FORMATS[f].BACKENDS]
        hits = [t for t in targets if t in FORMATS and name in FORMATS[t].BACKENDS]
        if not hits:
            known = "; ".join(f"{n.upper()}: {', '.join(f.BACKENDS)}" for n, f in FORMATS.items() if f.BACKENDS)
            raise UsageError(f"--backend {value!r} does not apply to the requested formats",
                             hint=f"{known}; use FORMAT=NAME to be explicit.")
        chosen.update(dict.fromkeys(hits, name))
    return chosen
