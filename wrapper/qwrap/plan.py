"""Request -> ordered steps. A step is a value before it is an action.

Each step names the steps it consumes and the files it produces (relative to the output
folder), and carries a fingerprint of everything that determines its outputs: its kind and
parameters, the toolchain pin, and the fingerprints of its inputs (the source model's file
fingerprint for the first step). Changing an option therefore changes exactly the
fingerprints of the steps it affects, and the runner re-runs exactly those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .journal import fingerprint


@dataclass(frozen=True)
class Step:
    id: str  # unique within a plan, e.g. "gguf.quantize:Q4_K_M"
    kind: str  # the action, e.g. "gguf.quantize"
    format: str  # which format module executes it
    label: str  # for humans
    inputs: tuple[str, ...]  # ids of the steps whose outputs it reads
    outputs: tuple[str, ...]  # files it writes, relative to the output folder
    params: tuple[tuple[str, Any], ...]
    fingerprint: str
    deliverable: bool = False  # its outputs are what the user asked for

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    def by_id(self) -> dict[str, Step]:
        return {s.id: s for s in self.steps}

    def consumers(self, step_id: str) -> list[Step]:
        return [s for s in self.steps if step_id in s.inputs]


class StepBuilder:
    """Builds steps in order, chaining fingerprints through inputs."""

    def __init__(self, source_fingerprint: str, pin: str):
        self.source_fingerprint = source_fingerprint
        self.pin = pin
        self.steps: list[Step] = []

    def add(
        self,
        step_id: str,
        kind: str,
        fmt: str,
        label: str,
        *,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        params: Mapping[str, Any] | None = None,
        deliverable: bool = False,
    ) -> Step:
        known = {s.id: s for s in self.steps}
        upstream = [known[i].fingerprint for i in inputs] or [self.source_fingerprint]
        items = tuple(sorted((params or {}).items()))
        fp = fingerprint(kind, items, self.pin, upstream, outputs)
        step = Step(step_id, kind, fmt, label, inputs, outputs, items, fp, deliverable)
        self.steps.append(step)
        return step

    def plan(self) -> Plan:
        return Plan(tuple(self.steps))
