"""The formats, one module each with the same shape, registered in one dict.

Like pre-commit's languages: each module exposes ``NAME``, ``validate_options(request)``,
``add_steps(builder, request, source, calib_sha)`` and ``execute(step, ctx)``; the
Protocol below lets the type checker verify every one.
"""

from __future__ import annotations

from typing import Protocol

from ..context import RunContext, StepOutcome
from ..hub import ModelSource
from ..plan import Step, StepBuilder
from ..request import Request
from . import awq, gguf, gptq


class Format(Protocol):
    NAME: str

    def validate_options(self, request: Request) -> None: ...

    def add_steps(
        self, b: StepBuilder, request: Request, source: ModelSource, calib_sha: str | None
    ) -> None: ...

    def execute(self, step: Step, ctx: RunContext) -> StepOutcome: ...

    def estimate_bytes(self, step: Step, parameters: int) -> int: ...


FORMATS: dict[str, Format] = {"gguf": gguf, "awq": awq, "gptq": gptq}
