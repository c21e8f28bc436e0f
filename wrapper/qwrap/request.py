"""The validated run request: what the user asked for, as one immutable value.

The token is deliberately not part of it: a request is written to the journal and the
JSON result, and a token must never be.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

FORMATS = ("gguf", "awq", "gptq")
OUTTYPES = ("auto", "f16", "bf16", "f32")


@dataclass(frozen=True)
class QuantOptions:
    """AWQ/GPTQ options (ignored by GGUF)."""

    bits: int = 4
    group_size: int = 128
    awq_version: str = "gemm"
    zero_point: bool = True
    act_order: bool = False
    sym: bool = True
    damp: float = 0.01
    awq_backend: str = "autoawq"
    gptq_backend: str = "gptqmodel"
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Request:
    model: str
    output: Path
    formats: tuple[str, ...] = ("gguf",)
    quants: tuple[str, ...] = ("Q4_K_M",)
    revision: str | None = None
    outtype: str = "auto"
    imatrix: str | None = None  # a file path, "auto", or None
    calib: str | None = None  # a text file, "wikitext2", or None (= wikitext2 when needed)
    force: bool = False
    keep_intermediate: bool = False
    threads: int = 0  # 0: all cores
    stall_timeout: float | None = 600.0
    trust_remote_code: bool = False
    preflight: bool = True
    quant_options: QuantOptions = field(default_factory=QuantOptions)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        data = dict(data)
        data["output"] = Path(data["output"])
        data["formats"] = tuple(data.get("formats", ("gguf",)))
        data["quants"] = tuple(data.get("quants", ()))
        data["quant_options"] = QuantOptions(**data.get("quant_options", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


AWQ_BACKENDS = ("autoawq", "gptqmodel")
GPTQ_BACKENDS = ("gptqmodel", "auto-gptq")


def backends_from(values: list[str], formats: list[str]) -> tuple[str, str]:
    """``--backend`` values -> (awq backend, gptq backend). A bare name goes to every
    requested format that knows it; ``awq=NAME`` / ``gptq=NAME`` are explicit."""
    awq, gptq = QuantOptions.awq_backend, QuantOptions.gptq_backend
    for value in values:
        fmt, _, name = value.rpartition("=")
        targets = [fmt] if fmt else [f for f in formats if f in ("awq", "gptq")]
        known = False
        for target in targets:
            if target == "awq" and name in AWQ_BACKENDS:
                awq, known = name, True
            elif target == "gptq" and name in GPTQ_BACKENDS:
                gptq, known = name, True
        if not known:
            raise UsageError(
                f"--backend {value!r} does not apply to the requested formats",
                hint=f"AWQ: {', '.join(AWQ_BACKENDS)}; GPTQ: {', '.join(GPTQ_BACKENDS)}; "
                "use awq=NAME or gptq=NAME to be explicit.",
            )
    return awq, gptq


def check_basic(request: Request) -> None:
    """Checks that need no format knowledge."""
    for fmt in request.formats:
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}", hint=f"Choose from: {', '.join(FORMATS)}.")
    if request.outtype not in OUTTYPES:
        raise UsageError(
            f"unknown --outtype {request.outtype!r}", hint=f"Choose from: {', '.join(OUTTYPES)}."
        )
    if request.threads < 0:
        raise UsageError("--threads must be 0 (all cores) or a positive number")
    if request.stall_timeout is not None and request.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be positive")
