"""The parent <-> worker contract: job descriptions in, JSON-line events out.

Stdlib only: the parent (no torch) imports this module as well as every worker
environment. A worker is started as ``python -m qwrap.workers.<module> JOB.json``; it writes
one JSON object per line to the inherited file descriptor named by ``QWRAP_EVENT_FD``
(stderr when unset, for manual runs), never to stdout, where libraries print.

Every event carries ``event`` (its name), ``v`` (PROTOCOL_VERSION) and ``time`` (Unix
seconds) besides its own fields. ``parse_event`` accepts unknown extra fields (newer
workers) but rejects unknown event names, missing fields and other protocol versions.

Which worker runs a job, and the bits each format's workers write, come from the backends'
declaration (backends.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from qwrap.workers.backends import BITS, VALIDATE_MODULE, WORKER_MODULES

PROTOCOL_VERSION = 1
EVENT_FD_ENV = "QWRAP_EVENT_FD"

DEVICES = ("auto", "cpu", "cuda")


def llama_kld_header(path: Path) -> tuple[int, int, int]:
    """n_ctx, n_vocab and n_chunk of a llama-perplexity base file (``--kl-divergence-base``,
    an ``eval_source_kind="llama-kld"``): ``_logits_``, then three int32. Its token ids (one
    int32 per position of every chunk) follow. ValueError when it is not one."""
    import struct

    with path.open("rb") as f:
        head = f.read(20)
    if len(head) != 20 or head[:8] != b"_logits_":
        raise ValueError(f"{path} is not a llama-perplexity base file")
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", head[8:])
    return int(n_ctx), int(n_vocab), int(n_chunk)
AWQ_VERSIONS = ("gemm", "gemv")

# error.kind values. oom: out of memory (finished layers stay checkpointed);
# backend_unavailable: this backend cannot run here (e.g. auto-gptq without CUDA);
# unsupported: the model/options are not supported by the backend; bad_job: the job file
# is invalid; validation: the artifact loaded but failed its checks; backend: the library
# raised; interrupted: SIGINT/SIGTERM; internal: a bug in the worker itself.
ERROR_KINDS = (
    "oom",
    "backend_unavailable",
    "unsupported",
    "bad_job",
    "checkpoint",
    "validation",
    "backend",
    "interrupted",
    "internal",
)


class ProtocolError(ValueError):
    """A line or job file that does not follow this protocol."""


# ---------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class TextSource:
    """Tokenized text for calibration or validation.

    ``path`` is UTF-8 text: ``.txt`` (documents separated by blank lines) or ``.jsonl``
    (one ``{"text": ...}`` per line). Documents are split deterministically: every 10th
    is ``held_out`` (validation), the rest are ``calibration``. ``source`` is the label
    recorded in metadata ("wikitext2", a file name). ``cache_dir`` caches the tokenized
    samples per (tokenizer, text, portion, n_samples, seq_len, seed).
    """

    path: str
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    portion: str = "calibration"
    source: str = ""
    cache_dir: str | None = None


@dataclass(frozen=True)
class QuantizeJob:
    """One AWQ or GPTQ quantization. ``output_dir`` is a fresh temporary folder the parent
    renames after validation; ``checkpoint_dir`` keeps per-layer state across restarts."""

    backend: str
    format: str
    model: str
    output_dir: str
    calibration: TextSource
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True  # AWQ
    version: str = "gemm"  # AWQ kernel layout
    sym: bool = True  # GPTQ
    act_order: bool = False  # GPTQ desc_act
    damp: float = 0.01  # GPTQ damp_percent
    device: str = "auto"
    checkpoint_dir: str | None = None
    trust_remote_code: bool = False  # the model's own code (auto_map) runs only when the user asked
    moe_routing: str = "routed"  # MoE calibration: as the router picks, or "all" experts (gptqmodel)
    task: str = "quantize"
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class ValidateJob:
    """Reload ``quantized`` and compare its next-token distributions with ``model``'s."""

    model: str
    quantized: str
    text: TextSource
    device: str = "auto"
    # The run's evaluation chunks (same tokens as every other runtime): a llama-perplexity base
    # file (its token ids) or a text to tokenize; ``eval_chunks`` 0 means no evaluation.
    eval_source: str | None = None
    eval_source_kind: str = "text"  # "text" | "llama-kld"
    eval_ctx: int = 512
    eval_chunks: int = 0
    reference_cache: str | None = None  # the source model's log-probs on those chunks, shared by artifacts
    trust_remote_code: bool = False
    task: str = "validate"
    protocol: int = PROTOCOL_VERSION


Job = QuantizeJob | ValidateJob
# What ``_build`` constructs from a JSON object.
_Built = TypeVar("_Built", QuantizeJob, ValidateJob, TextSource)


def worker_module(job: Job) -> str:
    """The ``python -m`` module that runs ``job``."""
    if isinstance(job, ValidateJob):
        return VALIDATE_MODULE
    return WORKER_MODULES[(job.backend, job.format)]


def job_to_json(job: Job) -> str:
    return json.dumps(asdict(job), indent=2, sort_keys=True) + "\n"


def write_job(job: Job, path: Path) -> Path:
    path.write_text(job_to_json(job), encoding="utf-8")
    return path


def load_job(path: str | Path) -> Job:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"cannot read job file {path}: {exc}") from exc
    return job_from_dict(data)


def job_from_dict(data: object) -> Job:
    if not isinstance(data, dict):
        raise ProtocolError("a job must be a JSON object")
    if data.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(f"job protocol {data.get('protocol')} != {PROTOCOL_VERSION}")
    task = data.get("task", "quantize")
    if task == "quantize":
        job: Job = _build(QuantizeJob, data, nested={"calibration": TextSource})
    elif task == "validate":
        job = _build(ValidateJob, data, nested={"text": TextSource})
    else:
        raise ProtocolError(f"unknown task {task!r}")
    check_job(job)
    return job


def _build(cls: type[_Built], data: dict[str, Any], *, nested: dict[str, type[TextSource]]) -> _Built:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ProtocolError(f"unknown job fields: {', '.join(unknown)}")
    missing = [f.name for f in fields(cls) if _required(f) and f.name not in data]
    if missing:
        raise ProtocolError(f"missing job fields: {', '.join(missing)}")
    values = dict(data)
    for name, sub in nested.items():
        if name in values:
            if not isinstance(values[name], dict):
                raise ProtocolError(f"job field {name} must be an object")
            values[name] = _build(sub, values[name], nested={})
    return cls(**values)


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def check_job(job: Job) -> None:
    """Value checks a worker needs before it loads anything; raises ProtocolError."""
    problems = _text_problems(job.calibration if isinstance(job, QuantizeJob) else job.text)
    if job.device not in DEVICES:
        problems.append(f"device must be one of {', '.join(DEVICES)}")
    if isinstance(job, QuantizeJob):
        problems += _quantize_problems(job)
    if problems:
        raise ProtocolError("invalid job: " + "; ".join(problems))


def _text_problems(text: TextSource) -> list[str]:
    problems = []
    if text.n_samples < 1 or text.seq_len < 2:
        problems.append("n_samples must be >= 1 and seq_len >= 2")
    if text.portion not in ("calibration", "held_out"):
        problems.append("portion must be calibration or held_out")
    return problems


def _quantize_problems(job: QuantizeJob) -> list[str]:
    problems = []
    if (job.backend, job.format) not in WORKER_MODULES:
        problems.append(f"backend {job.backend!r} does not write format {job.format!r}")
    if job.bits not in BITS.get(job.format, ()):
        problems.append(f"{job.format} bits must be one of {BITS.get(job.format, ())}")
    if job.group_size != -1 and job.group_size < 1:
        problems.append("group_size must be -1 (per channel) or positive")
    if job.version not in AWQ_VERSIONS:
        problems.append(f"version must be one of {', '.join(AWQ_VERSIONS)}")
    if not 0 < job.damp < 1:
        problems.append("damp must be between 0 and 1")
    return problems


# -------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Started:
    """The worker runs and has read its job; nothing heavy is loaded yet."""

    name: ClassVar[str] = "started"
    task: str
    backend: str
    pid: int
    device: str
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerStarted:
    name: ClassVar[str] = "layer_started"
    index: int
    total: int


@dataclass(frozen=True)
class LayerDone:
    """``resumed``: restored from a checkpoint instead of computed in this run.
    Memory peaks are for this layer only where the platform allows resetting them."""

    name: ClassVar[str] = "layer_done"
    index: int
    total: int
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None
    resumed: bool = False


@dataclass(frozen=True)
class Progress:
    """Coarse stages: load, calibration, quantize, pack, save, validate."""

    name: ClassVar[str] = "progress"
    stage: str
    done: int
    total: int
    unit: str


@dataclass(frozen=True)
class WarningEvent:
    name: ClassVar[str] = "warning"
    message: str
    source: str = "qwrap"


@dataclass(frozen=True)
class CheckpointSaved:
    name: ClassVar[str] = "checkpoint_saved"
    index: int
    path: str


@dataclass(frozen=True)
class Result:
    """``files``: paths relative to ``output_dir``; ``metadata``: settings, calibration,
    versions, timings, memory peaks (validation: kl_divergence, tokens, finite, ...)."""

    name: ClassVar[str] = "result"
    output_dir: str
    files: list[str]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Error:
    """``kind`` is one of ERROR_KINDS; ``hint`` the next step for the user; ``detail``
    a traceback for the log, not for the terminal."""

    name: ClassVar[str] = "error"
    kind: str
    message: str
    hint: str | None = None
    detail: str | None = None


Event = Started | LayerStarted | LayerDone | Progress | WarningEvent | CheckpointSaved | Result | Error
EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (Started, LayerStarted, LayerDone, Progress, WarningEvent, CheckpointSaved, Result, Error)
}


def event_dict(event: Event) -> dict[str, Any]:
    return {"event": event.name, "v": PROTOCOL_VERSION, "time": time.time(), **asdict(event)}


def encode_event(event: Event) -> bytes:
    return (json.dumps(event_dict(event), allow_nan=False) + "\n").encode("utf-8")


def parse_event(line: str | bytes) -> dict[str, Any]:
    """One line from the event channel -> its dict; ProtocolError when malformed."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {line[:200]!r}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("an event must be a JSON object")
    if data.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"event protocol {str(data.get('v'))[:40]!r} != {PROTOCOL_VERSION}")
    name = data.get("event")
    cls = EVENT_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown event {str(name)[:80]!r}")
    missing = [f.name for f in fields(cls) if _required(f) and f.name not in data]
    if missing:
        raise ProtocolError(f"{name} event lacks {', '.join(missing)}")
    malformed = [f.name for f in fields(cls) if f.name in data and not _has_type(data[f.name], str(f.type))]
    if malformed:
        raise ProtocolError(f"{name} event has a malformed {', '.join(malformed)}")
    if cls is Error and data["kind"] not in ERROR_KINDS:
        raise ProtocolError(f"unknown error kind {data['kind']!r}")
    return data


_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                          "None": (type(None),), "dict": (dict,), "list": (list,)}


def _has_type(value: object, annotation: str) -> bool:
    """``value`` fits a field annotated ``annotation`` ("int", "int | None", "dict[str, Any]"...),
    so the parent can use an event's fields without checking each one."""
    for part in annotation.split("|"):
        kinds = _JSON_TYPES.get(part.strip().split("[", 1)[0], (object,))
        if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
            return True
    return False


_lock = threading.Lock()


def emit(event: Event) -> None:
    """Write one event line to the channel; safe from any thread."""
    fd_text = os.environ.get(EVENT_FD_ENV)
    fd = int(fd_text) if fd_text else sys.stderr.fileno()
    data = encode_event(event)
    with _lock:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
