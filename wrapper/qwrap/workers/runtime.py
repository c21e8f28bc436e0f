"""What every worker's ``main`` shares: job loading, device choice, error events, memory.

Only stdlib at import time; torch is imported inside functions, after ``prepare_device``
has had the chance to hide CUDA (``--device cpu`` must not touch a GPU).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO, TypeVar

from qwrap.workers import protocol as p

J = TypeVar("J", p.QuantizeJob, p.ValidateJob)

RESUME_HINT = "Finished layers are checkpointed: rerun the same command to resume."
QWRAP_PACKAGE = Path(__file__).resolve().parents[1]  # the qwrap package these workers belong to
OOM_HINT = RESUME_HINT + " Lower --calib-samples or --calib-seq-len to reduce peak memory."


class WorkerError(Exception):
    """An expected failure, reported as an ``error`` event of ``kind``."""

    def __init__(self, kind: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def versions(*dists: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("torch", "transformers", *dists):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def prepare_device(requested: str) -> None:
    """Before torch is imported: hide GPUs when the job asks for the CPU."""
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise WorkerError("unsupported", "--device cuda was given but no CUDA device is visible",
                          hint="Use --device auto or --device cpu.")
    return requested


def check_group_size(model: Any, group_size: int) -> None:
    """Group sizes must divide every quantized layer's input width; checked right after loading."""
    import torch

    if group_size == -1:
        return
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in name}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise WorkerError("unsupported", f"group size {group_size} does not divide layer widths {bad}",
                          hint="Pick a --group-size that divides every layer's input width.")


def run(expected: type[J], body: Callable[[J], None], *, backend: str) -> NoReturn:
    """``python -m`` entry: load the job from argv, run ``body``, map failures to events."""
    code = 0
    # SIGTERM (the supervisor's second step) unwinds like Ctrl-C, so the parent gets an
    # "interrupted" event; GPTQModel swaps in its own stop-at-next-checkpoint handler.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        job = _load(expected)
        prepare_device(job.device)
        _capture_warnings()
        body(job)
    except WorkerError as exc:
        p.emit(p.Error(kind=exc.kind, message=str(exc), hint=exc.hint))
        code = 2 if exc.kind == "bad_job" else 1
    except KeyboardInterrupt as exc:
        p.emit(p.Error(kind="interrupted", message=f"interrupted {exc}".strip(), hint=RESUME_HINT))
        code = 130
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        p.emit(failure_event(exc, backend))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: library thread pools (gptqmodel) must not keep a finished worker alive.
    os._exit(code)


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _load(expected: type[J]) -> J:
    if len(sys.argv) != 2:
        raise WorkerError("bad_job", f"usage: python -m {sys.argv[0]} JOB.json")
    try:
        job = p.load_job(sys.argv[1])
    except p.ProtocolError as exc:
        raise WorkerError("bad_job", str(exc)) from exc
    if not isinstance(job, expected):
        raise WorkerError("bad_job", f"this worker runs {expected.__name__}, got {type(job).__name__}")
    out = Path(job.output_dir) if isinstance(job, p.QuantizeJob) else None
    if out is not None and out.is_dir() and any(out.iterdir()):
        # Leftovers of another attempt would end up in the artifact.
        raise WorkerError("bad_job", f"output_dir {out} is not empty")
    return job


def failure_event(exc: BaseException, backend: str) -> p.Error:
    detail = "".join(traceback.format_exception(exc))
    if is_oom(exc):
        return p.Error(kind="oom", message=f"out of memory: {exc}", hint=OOM_HINT, detail=detail)
    if _raised_in_qwrap(exc):
        return p.Error(kind="internal", message=f"{type(exc).__name__}: {exc}",
                       hint=f"See the step log for the {backend} traceback.", detail=detail)
    # the backend's own failure: where it failed (a bare assert says nothing by itself)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ is not None else None
    at = ""
    if where is not None:
        short = where.filename.split("site-packages" + os.sep)[-1]
        at = f" (in {short}:{where.lineno}, {where.name}" + (f": `{where.line}`)" if where.line else ")")
    return p.Error(kind="backend", message=f"{backend} failed: {type(exc).__name__}: {exc}".rstrip(": ") + at,
                   hint=f"This failed inside {backend}, not qwrap: its traceback is in the step log. Another "
                        "--backend, or another --format (gguf needs no backend), may quantize this architecture.",
                   detail=detail)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def _raised_in_qwrap(exc: BaseException) -> bool:
    """Whether the innermost frame is qwrap's own code (this package, wherever it is installed;
    the backends' environments live under qwrap's cache, so a path naming qwrap is not enough)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and Path(last).resolve().is_relative_to(QWRAP_PACKAGE)


def _capture_warnings() -> None:
    """Python warnings become ``warning`` events (once per message) and still print."""
    seen: set[str] = set()
    original = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        text = f"{category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            p.emit(p.WarningEvent(message=text, source=Path(filename).parent.name))
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def warn(message: str) -> None:
    p.emit(p.WarningEvent(message=message))


# -------------------------------------------------------------------------------- memory


@dataclass
class LayerMeter:
    """Wall time and peak memory of one layer.

    Linux lets a process reset its RSS high-water mark (``/proc/self/clear_refs``), which
    makes the peak per layer exact; elsewhere the peak is the process's since start.
    """

    cuda: bool
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        _reset_rss_peak()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def stop(self, index: int, total: int, *, resumed: bool = False) -> p.LayerDone:
        gpu = None
        if self.cuda:
            import torch

            gpu = int(torch.cuda.max_memory_allocated())
        return p.LayerDone(index=index, total=total, seconds=round(time.monotonic() - self.started, 3),
                           peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=gpu, resumed=resumed)


def release_memory(cuda: bool) -> None:
    """Between layers: drop garbage and hand cached CUDA blocks back."""
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
