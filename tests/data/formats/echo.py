"""A format added by the test that proves adding a format is one module and one registry
line: its one step runs a real child (the parent's Python) that writes the artifact, and its
deliverable step validates it and renames it into place."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import Check
from ..context import Inputs, StepContext, StepOutcome
from ..errors import UsageError, ValidationFailedError
from ..options import Listing, Option
from ..plan import Estimate, Plan, PlanBuilder, Step

NAME = "echo"
TITLE = "Echo (test format)"
SUMMARY = "a text file holding --echo-text"
BACKENDS: tuple[str, ...] = ()
OPTIONS: tuple[Option, ...] = (Option("echo_text", str, "hello", "Text the echo artifact holds."),)


@dataclass(frozen=True)
class Options:
    text: str = "hello"


def make_options(values: Mapping[str, Any], backend: str | None) -> Options:
    return Options(values["echo_text"])


def options_from_json(data: Mapping[str, Any]) -> Options:
    return Options(**data)


def validate(o: Options) -> None:
    if not o.text:
        raise UsageError("--echo-text must not be empty")


def needs_calibration(o: Options) -> bool:
    return False


def wants_calibration(o: Options) -> bool:
    return False


def requirements(o: Options) -> tuple[str, ...]:
    return ()


def checks(o: Options, model: Any, *, thorough: bool) -> list[Check]:
    return [Check("echo", True, "nothing to check")]


def add_steps(b: PlanBuilder, o: Options, model: Any) -> None:
    final = f"{model.source.name}-echo.txt"
    size = len(o.text.encode())
    w = b.add("echo.write", "echo.write", NAME, "write", outputs=(final + ".partial",), params={"text": o.text},
              estimate=Estimate(size, 1 << 20, size, 0.1))
    b.add("echo.validate", "echo.validate", NAME, "validate", inputs={"artifact": w.id}, outputs=(final,),
          params={"text": o.text}, deliverable=True)


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    if step.kind == "echo.write":
        out = ctx.path(step.outputs[0])
        code = "import sys; open(sys.argv[1], 'w').write(sys.argv[2]); print('wrote', sys.argv[1])"
        result = ctx.run_tool([sys.executable, "-c", code, str(out), step.param("text")], what="echo writer")
        return StepOutcome((out,), {"bytes": out.stat().st_size}, result.peak_rss_bytes)
    partial = inputs["artifact"].path
    if partial.read_text() != step.param("text"):
        raise ValidationFailedError(f"{partial} does not hold the text")
    final = ctx.path(step.outputs[0])
    ctx.check_final(final)
    return StepOutcome((), {"validated": True, "quality": "exact"}, renames=((partial, final),))


def plan_artifact(step: Step, plan: Plan) -> dict[str, Any]:
    return {"format": NAME, "quant": None, "name": Path(step.outputs[0]).name,
            "expected_bytes": len(step.param("text").encode()), "bits_per_weight": None}


def result_fields(own: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]],
                  readers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"quality": {"kld_mean": 0.0, "runtime": own.get("quality")}, "bits_per_weight": None}


def listing() -> Listing:
    return Listing(("option",), (("--echo-text",),))


LIBRARY = "echo"


def publishable(path: Path) -> str | None:
    return None if path.is_file() else f"{path.name} is missing"


def card_usage(paths: list[str], *, chat: bool) -> str:
    return f"cat {paths[0]}"
