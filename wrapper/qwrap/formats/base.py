"""What every format module is (the ``Format`` Protocol) and what is shared between formats and
their readers (``producer_chain``). The registry (``formats/__init__.py``) re-exports both; a
format module imports from here, never from the registry, which imports every format."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..checks import Check
from ..context import Inputs, StepContext, StepOutcome
from ..options import Listing, Option
from ..plan import Plan, PlanBuilder, Step

if TYPE_CHECKING:
    from ..model import ModelInfo
class Format(Protocol):
    NAME: str
    TITLE: str  # the heading of its option group in --help
    SUMMARY: str  # one line for docs and `qwrap formats`
    OPTIONS: tuple[Option, ...]  # its option group (shared options may appear in several groups)
    BACKENDS: tuple[str, ...]  # --backend choices, the default first; () when there is no choice
    LIBRARY: str  # the model card's `library_name` on the Hub for its artifacts

    def make_options(self, values: Mapping[str, Any], backend: str | None) -> Any:
        """The format's options value from the CLI values of its OPTIONS (and --backend)."""
        ...

    def options_from_json(self, data: Mapping[str, Any]) -> Any: ...

    def validate(self, options: Any) -> None:
        """Everything checkable before the model is resolved; raises UsageError & co."""
        ...

    def needs_calibration(self, options: Any) -> bool:
        """Calibration text is required (the run fails without it)."""
        ...

    def wants_calibration(self, options: Any) -> bool:
        """Calibration text is used when available (the run goes on without it, and says so)."""
        ...

    def requirements(self, options: Any) -> tuple[str, ...]:
        """What must be installed: "llama.cpp" and/or environment names (envs.py)."""
        ...

    def checks(self, options: Any, model: ModelInfo, *, thorough: bool) -> list[Check]:
        """Model checks before heavy work; ``thorough`` (for `plan`) may run quick tools."""
        ...

    def add_steps(self, b: PlanBuilder, options: Any, model: ModelInfo) -> None: ...

    def execute(self, step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome: ...

    def plan_artifact(self, step: Step, plan: Plan) -> dict[str, Any]:
        """A deliverable step's row in `plan`: quant, name, expected_bytes, bits_per_weight."""
        ...

    def result_fields(self, own: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]],
                      readers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """A deliverable's result fields (bits_per_weight, quality, calibration, ...) from its
        own facts, its inputs' facts (by role) and the facts of the steps that read it (by
        kind: e.g. its measurement)."""
        ...

    def listing(self) -> Listing:
        """What it can make, for `qwrap formats`."""
        ...

    def card_usage(self, paths: list[str], *, chat: bool) -> str:
        """How to use these artifacts (relative paths), for the model card; ``chat``: the source has a
        chat template (carried in the artifacts), so show it applied."""
        ...

    def publishable(self, path: Path) -> str | None:
        """Why this artifact must not be pushed to the Hub as it is, or None."""
        ...


def producer_chain(step: Step, plan: Plan) -> list[Step]:
    """A deliverable and the steps of its own format that it reads, nearest first."""
    by_id = plan.by_id()
    chain = [step]
    for input_id in step.input_ids:
        upstream = by_id.get(input_id)
        if upstream is not None and upstream.format == step.format and not upstream.deliverable:
            chain.append(upstream)
    return chain
