"""The plan: steps as complete values, in a DAG, with their estimates. `plan` prints it, `run`
executes it.

A step names the steps it reads (by role: ``{"model": "gguf.convert"}``), the files outside the
plan it reads (the source model, the calibration text, a user's imatrix), the files it writes
(relative to the output folder) and its parameters: everything that determines its outputs
and nothing that does not (thread counts are given by the runner). Its fingerprint hashes
kind, parameters, toolchain pin, outputs and the fingerprints of its inputs (the source
model's identity for a step with none), so an option change re-runs exactly the steps it
affects. An action needs nothing but its step, its inputs' outputs and a narrow context,
which is what lets a step run later, elsewhere, from the plan alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


def fingerprint(*parts: object) -> str:
    import hashlib  # here, not at the top: `qwrap --help` imports this module
    import json

    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class StepState(str, Enum):
    """A step's state: journaled (started, done, failed, interrupted) or decided by a run
    (skipped: proven done; pending: not run yet)."""

    STARTED = "started"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"
    PENDING = "pending"




@dataclass(frozen=True)
class Estimate:
    """What a step is expected to cost, from the model's headers (never its weights)."""

    output_bytes: int = 0  # what its outputs weigh once it is done (a rename names the renamed file)
    peak_ram_bytes: int = 0  # its processes' peak resident memory
    peak_disk_bytes: int = 0  # disk it adds at its peak (new outputs + its scratch)
    seconds: float | None = None  # where a cost model exists (measured on a 2-core VM)

    def to_json(self) -> dict[str, Any]:
        return {"output_bytes": self.output_bytes, "peak_ram_bytes": self.peak_ram_bytes,
                "peak_disk_bytes": self.peak_disk_bytes,
                "seconds": round(self.seconds, 1) if self.seconds is not None else None}


@dataclass(frozen=True)
class Step:
    id: str  # unique within a plan, e.g. "gguf.quantize:Q4_K_M"
    kind: str  # the action, e.g. "gguf.quantize"
    format: str  # the format module that owns and executes it
    label: str  # for humans
    inputs: tuple[tuple[str, str], ...]  # (role, step id) of the steps whose outputs it reads
    outputs: tuple[str, ...]  # files it writes, relative to the output folder
    params: tuple[tuple[str, Any], ...]
    fingerprint: str
    estimate: Estimate = Estimate()
    files: tuple[tuple[str, str], ...] = ()  # (role, absolute path) read from outside the plan
    scratch: tuple[str, ...] = ()  # folders only a resume needs, removed after a successful run
    deliverable: bool = False  # its outputs are what the user asked for
    threaded: bool = False  # the tool uses the thread count it is given (else one core)
    exclusive: str | None = None  # steps with the same value never run at the same time (one GPU)
    provides: tuple[str, ...] = ()  # what other formats' steps may read from it ("eval-tokens")
    gpu: bool = False  # wants a GPU when a scheduler has one to give (--emit: --gres=gpu:1)

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def file(self, role: str) -> str:
        return dict(self.files)[role]

    @property
    def input_ids(self) -> tuple[str, ...]:
        return tuple(i for _, i in self.inputs)

    def input_id(self, role: str) -> str | None:
        return dict(self.inputs).get(role)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "format": self.format, "label": self.label,
                "inputs": dict(self.inputs), "outputs": list(self.outputs), "params": dict(self.params),
                "files": dict(self.files), "fingerprint": self.fingerprint,
                "deliverable": self.deliverable, "threaded": self.threaded, "gpu": self.gpu,
                "estimates": self.estimate.to_json()}


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]  # in an order where every input comes before its consumers
    parameters: int = 0  # the source model's parameter count

    def by_id(self) -> dict[str, Step]:
        return {s.id: s for s in self.steps}

    def consumers(self, step_id: str) -> list[Step]:
        return [s for s in self.steps if step_id in s.input_ids]

    def totals(self) -> dict[str, Any]:
        """Everything the plan writes stays until the run ends: peak disk is the sum of what each
        step adds; the output is what the deliverables weigh."""
        seconds = [s.estimate.seconds for s in self.steps]
        return {
            "steps": len(self.steps),
            "output_bytes": sum(s.estimate.output_bytes for s in self.steps if s.deliverable),
            "peak_disk_bytes": sum(s.estimate.peak_disk_bytes for s in self.steps),
            "peak_ram_bytes": max((s.estimate.peak_ram_bytes for s in self.steps), default=0),
            "seconds": round(sum(x for x in seconds if x is not None), 1) if any(
                x is not None for x in seconds) else None,
        }


@dataclass
class PlanBuilder:
    """Builds steps in order, chaining fingerprints through inputs."""

    source_fingerprint: str
    pin: str
    parameters: int = 0
    steps: list[Step] = field(default_factory=list)

    def add(
        self,
        step_id: str,
        kind: str,
        fmt: str,
        label: str,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: tuple[str, ...] = (),
        params: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        estimate: Estimate = Estimate(),
        scratch: tuple[str, ...] = (),
        deliverable: bool = False,
        threaded: bool = False,
        exclusive: str | None = None,
        provides: tuple[str, ...] = (),
        gpu: bool = False,
    ) -> Step:
        known = {s.id: s for s in self.steps}
        wired = tuple((inputs or {}).items())
        missing = [i for _, i in wired if i not in known]
        if missing:
            raise ValueError(f"step {step_id} reads {missing}, which are not in the plan (yet)")
        upstream = [known[i].fingerprint for _, i in wired] or [self.source_fingerprint]
        items = tuple(sorted((params or {}).items()))
        fp = fingerprint(kind, items, self.pin, upstream, outputs)
        scratch = tuple(s.replace("{fingerprint}", fp[:12]) for s in scratch)
        step = Step(step_id, kind, fmt, label, wired, outputs, items, fp, estimate,
                    tuple(sorted((files or {}).items())), scratch, deliverable, threaded, exclusive, provides, gpu)
        if step_id in known:
            raise ValueError(f"two steps with id {step_id}")
        self.steps.append(step)
        return step

    def provider(self, what: str) -> Step | None:
        """The step already in the plan that provides ``what`` (e.g. the evaluation's token ids),
        so a format can read another's output without naming it."""
        return next((s for s in self.steps if what in s.provides), None)

    def plan(self) -> Plan:
        return Plan(tuple(self.steps), self.parameters)
