"""GGUF: convert once to 16-bit with the pinned converter, optionally compute an importance
matrix, quantize each requested type with llama-quantize, validate each artifact (and split
the ones planned over --split-max-size), measure each against the 16-bit model.

This package owns everything GGUF, one role a module:

- ``declaration``: its name, option group, options value and the checks that need no model;
- ``quants``: the type table;
- ``estimates``: the cost model, one estimator for every step kind;
- ``steps``: its steps for a request;
- ``modelchecks``: the model checks (the converter's architectures, a vocab-only conversion);
- ``actions``: one action per step kind;
- ``budgets``, ``search``, ``budget_actions``: size budgets (``--target-*``): the budget values,
  the search as pure functions, and the sensitivity, search, compare and choose actions;
- ``recipes``, ``ggmltypes``: per-tensor type rules (``--recipe``) and ggml's tensor types;
- ``rows``: its rows in the plan, the result, the model card and `qwrap formats`.

This module is what the registry sees (the ``Format`` Protocol). `qwrap --help` loads only
the declaration, the type table and the rows; the rest (the toolchain, the environments, the
supervisor behind them) is loaded by the three entry points below when a plan is built or a
step runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .declaration import (
    BACKENDS,
    LIBRARY,
    NAME,
    OPTIONS,
    SUMMARY,
    TITLE,
    Options,
    make_options,
    needs_calibration,
    options_from_json,
    requirements,
    validate,
    wants_calibration,
)
from .quants import QUANT_TYPES
from .rows import card_usage, listing, plan_artifact, publishable, result_fields

if TYPE_CHECKING:
    from ...checks import Check
    from ...context import Inputs, StepContext, StepOutcome
    from ...model import ModelInfo
    from ...plan import PlanBuilder, Step

__all__ = [
    "BACKENDS", "LIBRARY", "NAME", "OPTIONS", "QUANT_TYPES", "SUMMARY", "TITLE", "Options", "add_steps", "card_usage",
    "checks", "execute", "listing", "make_options", "needs_calibration", "options_from_json", "plan_artifact",
    "publishable", "requirements", "result_fields", "validate", "wants_calibration",
]


def checks(o: Options, model: ModelInfo, *, thorough: bool) -> list[Check]:
    from .modelchecks import checks as run

    return run(o, model, thorough=thorough)


def add_steps(b: PlanBuilder, o: Options, model: ModelInfo) -> None:
    from .steps import add_steps as add

    add(b, o, model)


BUDGET_KINDS = frozenset({"gguf.sensitivity", "gguf.search", "gguf.compare", "gguf.choose"})


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    if step.kind in BUDGET_KINDS:
        from .budget_actions import execute as budget

        return budget(step, inputs, ctx)
    from .actions import execute as run

    return run(step, inputs, ctx)
