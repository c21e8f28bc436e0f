"""The run's outcome and its result: built once, after the runner, and read by everything that
comes after it.

``RunOutcome`` is what `run` made (the request, the model, the plan, each step's summary);
``build_result`` turns it into a ``RunResult`` once, with every artifact row carrying what the
renderers need from its format (its Hub library, its usage text), so the terminal table, the
model card and the quality page read only the result, never the format registry, never the
journal. ``RunResult.to_json`` is the ``--json`` document and ``OUT/.checkpoint/result.json``;
``from_json`` checks its shape on load (``load`` for `push`), so a damaged or foreign file is a
clear error instead of a KeyError deep in a renderer.

The decisions that follow from a result live here too: which artifacts failed their quality
gate (a ``--step`` run leaves the gates to the run that ends the plan), and whether it may be
pushed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .errors import QualityGateError, UsageError
from .formats import FORMATS, producer_chain
from .journal import checkpoint_dir
from .model import ModelInfo, chat_template
from .plan import Plan, StepState
from .quality import Gates, Quality, SchemaError, figure, parse_gates, within_noise
from .request import Request, safe_argv
from .runner import StepSummary
from .toolchain import read_pin
from .units import human_bytes

RESULT_SCHEMA = "qwrap.result/2"  # additions keep the number: every /2 key is still there
RESULT_FILE = "result.json"

T = TypeVar("T")


@dataclass(frozen=True)
class RunOutcome:
    """What a `qwrap run` made: the request, the model, the plan and every step's summary."""

    request: Request
    model: ModelInfo
    plan: Plan
    summaries: list[StepSummary]
    warnings: list[str]
    command: list[str] = field(default_factory=list)  # the `qwrap run` command that made it
    calibration_note: str = ""  # why calibration text that was wanted is missing ("" when not)
    complete: bool = True  # False for a --step run: other processes run the rest of the plan


# -- the typed result -----------------------------------------------------------------------


def _get(data: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str, *,
         optional: bool = False) -> Any:
    """data[key], checked: present (or None when ``optional``) and of ``kind``."""
    if not isinstance(data, Mapping):
        raise SchemaError(f"{where} is {type(data).__name__}, not an object")
    if key not in data:
        raise SchemaError(f"{where} has no {key!r}")
    value = data[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise SchemaError(f"{where}.{key} is {value!r}, not a number")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SchemaError(f"{where}.{key} is {value!r}, not {name}")
    return value


@dataclass(frozen=True)
class Shard:
    path: str  # the file's name, beside the first shard
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, data: Any, where: str) -> Shard:
        return cls(_get(data, "path", str, where), _get(data, "bytes", int, where), _get(data, "sha256", str, where))


def _opt(data: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str) -> Any:
    """data[key] when present (None when absent or null), checked: for keys added to schema /2
    after its first results, which still load."""
    return _get(data, key, kind, where, optional=True) if isinstance(data, Mapping) and key in data else None


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


@dataclass(frozen=True)
class RecipeRef:
    """The per-tensor recipe an artifact was made with, written beside it (``file``, relative to
    OUT): ``rules`` of them (0: the stock mix), ``sha256`` of the rules alone."""

    file: str
    sha256: str
    rules: int

    @classmethod
    def from_json(cls, data: Any, where: str) -> RecipeRef:
        return cls(_get(data, "file", str, where), _get(data, "sha256", str, where), _get(data, "rules", int, where))


@dataclass(frozen=True)
class Fallback:
    """A tensor llama-quantize gave another type than planned (its rows do not take the planned
    type's blocks)."""

    tensor: str
    wanted: str
    got: str

    @classmethod
    def from_json(cls, data: Any, where: str) -> Fallback:
        return cls(_get(data, "tensor", str, where), _get(data, "wanted", str, where), _get(data, "got", str, where))


@dataclass(frozen=True)
class Candidate:
    """One file measured for a size budget: the searched recipe's, or the stock type's."""

    quant: str
    bytes: int
    bits_per_weight: float | None
    quality: Quality | None

    def to_json(self) -> dict[str, Any]:
        return {"quant": self.quant, "bytes": self.bytes, "bits_per_weight": self.bits_per_weight,
                "quality": self.quality.to_json() if self.quality is not None else None}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Candidate:
        quality = _get(data, "quality", Mapping, where, optional=True)
        return cls(_get(data, "quant", str, where), _get(data, "bytes", int, where),
                   _float(_opt(data, "bits_per_weight", (int, float), where)),
                   Quality.from_json(quality, f"{where}.quality") if quality is not None else None)


@dataclass(frozen=True)
class Budget:
    """A ``--target-*`` artifact: what was asked (``target`` as the user wrote it), the file the
    search made and the stock type nearest its size, both measured on the same tokens, which of
    them shipped (``chosen``: "searched" or "stock") and why."""

    target: str
    budget_bytes: int | None
    kld_limit: float | None
    chosen: str
    reason: str
    predicted_kld: float | None
    searched: Candidate
    stock: Candidate | None  # None with --no-compare

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "budget_bytes": self.budget_bytes, "kld_limit": self.kld_limit,
                "chosen": self.chosen, "reason": self.reason, "predicted_kld": self.predicted_kld,
                "searched": self.searched.to_json(), "stock": self.stock.to_json() if self.stock else None}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Budget:
        stock = _get(data, "stock", Mapping, where, optional=True)
        chosen = _get(data, "chosen", str, where)
        if chosen not in ("searched", "stock"):
            raise SchemaError(f"{where}.chosen is {chosen!r}, not searched or stock")
        return cls(_get(data, "target", str, where), _get(data, "budget_bytes", int, where, optional=True),
                   _float(_get(data, "kld_limit", (int, float), where, optional=True)), chosen,
                   _get(data, "reason", str, where),
                   _float(_get(data, "predicted_kld", (int, float), where, optional=True)),
                   Candidate.from_json(_get(data, "searched", Mapping, where), f"{where}.searched"),
                   Candidate.from_json(stock, f"{where}.stock") if stock is not None else None)

    def difference(self) -> str:
        """The searched file against the stock one, in words: its KLD change and whether the
        measurement can tell them apart ("" when not compared)."""
        if self.stock is None:
            return ""
        mine, theirs = self.searched.quality, self.stock.quality
        a = mine.kld_mean if mine is not None else None
        b = theirs.kld_mean if theirs is not None else None
        if a is None or b is None or mine is None or theirs is None:
            return ""
        change = f"{(a - b) / b:+.0%} KLD" if b else f"KLD {a - b:+.3g}"
        noise = "within noise" if within_noise(mine, theirs) else "beyond noise"
        return f"{change} ({noise}), {self.searched.bytes - self.stock.bytes:+,} bytes"


@dataclass(frozen=True)
class Artifact:
    """One deliverable of the run, with what every renderer needs from its format."""

    format: str
    quant: str | None
    path: str  # absolute, in the output folder as it was at the end of the run
    bytes: int | None
    sha256: str | None
    bits_per_weight: float | None
    validated: bool
    quality: Quality | None  # None when not measured (--no-eval)
    gate: str | None  # "passed" / "failed" against --max-kld, None when no limit applies
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    reused: bool
    calibration: Mapping[str, Any] | None  # what the backend recorded of its calibration (AWQ/GPTQ)
    trust_remote_code: bool  # the model's own code ran to make it (AWQ/GPTQ with --trust-remote-code)
    library: str  # the model card's library_name for it (its format's)
    usage: str  # how to use it, for the model card (its format's text, with its path in OUT)
    shards: tuple[Shard, ...] = ()  # a split set (--split-max-size): each shard, the first at `path`
    recipe: RecipeRef | None = None  # the per-tensor recipe (--recipe, or a size budget's), beside the file
    fallbacks: tuple[Fallback, ...] = ()  # tensors the quantizer could not give their planned type
    planned_bits_per_weight: float | None = None  # before fallbacks (GGUF); None when not known
    budget: Budget | None = None  # a --target-* artifact: the search, the stock comparison, the choice

    @property
    def name(self) -> str:
        """'gguf Q4_K_M', as messages name it."""
        return f"{self.format} {self.quant}"

    @property
    def kld_mean(self) -> float | None:
        return self.quality.kld_mean if self.quality is not None else None

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["quality"] = self.quality.to_json() if self.quality is not None else None
        doc["calibration"] = dict(self.calibration) if self.calibration is not None else None
        doc["shards"] = [dataclasses.asdict(s) for s in self.shards]
        doc["recipe"] = dataclasses.asdict(self.recipe) if self.recipe is not None else None
        doc["fallbacks"] = [dataclasses.asdict(f) for f in self.fallbacks]
        doc["budget"] = self.budget.to_json() if self.budget is not None else None
        return doc

    @classmethod
    def from_json(cls, data: Any, where: str) -> Artifact:
        num = (int, float)
        quality = _get(data, "quality", Mapping, where, optional=True)
        bpw = _get(data, "bits_per_weight", num, where, optional=True)
        recipe = _opt(data, "recipe", Mapping, where)
        budget = _opt(data, "budget", Mapping, where)
        return cls(
            format=_get(data, "format", str, where), quant=_get(data, "quant", str, where, optional=True),
            path=_get(data, "path", str, where), bytes=_get(data, "bytes", int, where, optional=True),
            sha256=_get(data, "sha256", str, where, optional=True),
            bits_per_weight=float(bpw) if bpw is not None else None,
            validated=_get(data, "validated", bool, where),
            quality=Quality.from_json(quality, f"{where}.quality") if quality is not None else None,
            gate=_get(data, "gate", str, where, optional=True), seconds=float(_get(data, "seconds", num, where)),
            peak_rss_bytes=_get(data, "peak_rss_bytes", int, where),
            peak_gpu_bytes=_get(data, "peak_gpu_bytes", int, where), reused=_get(data, "reused", bool, where),
            calibration=_get(data, "calibration", Mapping, where, optional=True),
            trust_remote_code=_get(data, "trust_remote_code", bool, where),
            library=_get(data, "library", str, where), usage=_get(data, "usage", str, where),
            shards=tuple(Shard.from_json(s, f"{where}.shards[{i}]")
                         for i, s in enumerate(_get(data, "shards", list, where))),
            recipe=RecipeRef.from_json(recipe, f"{where}.recipe") if recipe is not None else None,
            fallbacks=tuple(Fallback.from_json(f, f"{where}.fallbacks[{i}]")
                            for i, f in enumerate(_opt(data, "fallbacks", list, where) or ())),
            planned_bits_per_weight=_float(_opt(data, "planned_bits_per_weight", num, where)),
            budget=Budget.from_json(budget, f"{where}.budget") if budget is not None else None,
        )


PROJECTOR = "projector"  # what the step that validates a vision model's projector provides


@dataclass(frozen=True)
class Projector:
    """A vision model's projector (llama.cpp's ``mmproj``), beside the text files: the vision
    tower and its projection in ``type`` (F16, Q8_0), loaded with the text file
    ``validated_with`` on an image before it was published. ``projector_type`` is what
    llama.cpp calls its projection (``clip.projector_type``)."""

    format: str
    path: str  # absolute, in the output folder as it was at the end of the run
    type: str
    bytes: int
    sha256: str
    validated: bool
    validated_with: str
    projector_type: str | None
    usage: str  # how to use it with the text files, for the model card

    @classmethod
    def from_json(cls, data: Any, where: str) -> Projector:
        return cls(_get(data, "format", str, where), _get(data, "path", str, where), _get(data, "type", str, where),
                   _get(data, "bytes", int, where), _get(data, "sha256", str, where),
                   _get(data, "validated", bool, where), _get(data, "validated_with", str, where),
                   _get(data, "projector_type", str, where, optional=True), _get(data, "usage", str, where))


@dataclass(frozen=True)
class StepRow:
    id: str
    state: str  # a StepState value
    fingerprint: str
    seconds: float | None
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None  # the worker's peak CUDA memory (0 on a CPU)

    @classmethod
    def from_json(cls, data: Any, where: str) -> StepRow:
        seconds = _get(data, "seconds", (int, float), where, optional=True)
        return cls(_get(data, "id", str, where), _get(data, "state", str, where),
                   _get(data, "fingerprint", str, where), float(seconds) if seconds is not None else None,
                   _get(data, "peak_rss_bytes", int, where, optional=True),
                   _get(data, "peak_gpu_bytes", int, where, optional=True))


@dataclass(frozen=True)
class Source:
    """The model the run quantized."""

    input: str  # as given: a folder or a Hub id
    name: str
    path: str
    repo_id: str | None
    revision: str | None
    chat_template: bool  # the source has a chat template (carried in the artifacts)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Source:
        return cls(_get(data, "input", str, where), _get(data, "name", str, where), _get(data, "path", str, where),
                   _get(data, "repo_id", str, where, optional=True), _get(data, "revision", str, where, optional=True),
                   _get(data, "chat_template", bool, where))


@dataclass(frozen=True)
class CalibrationUse:
    """What calibration text the run used, or why there was none: ``state`` is "used" (then
    ``label`` names the text), "missing" (wanted, e.g. for GGUF's importance matrix, but not
    available: ``note`` says why and what happened instead) or "not needed"."""

    state: str
    label: str | None = None
    note: str | None = None

    STATES = ("used", "missing", "not needed")

    @classmethod
    def from_json(cls, data: Any, where: str) -> CalibrationUse:
        state = _get(data, "state", str, where)
        if state not in cls.STATES:
            raise SchemaError(f"{where}.state is {state!r}, not one of {', '.join(cls.STATES)}")
        return cls(state, _get(data, "label", str, where, optional=True), _get(data, "note", str, where, optional=True))


@dataclass(frozen=True)
class QualityReference:
    """The evaluation every artifact was measured on: its text, chunking and the 16-bit model's
    perplexity on it; ``bridge``: how far the two runtimes' 16-bit references differ."""

    text: str
    text_identity: str | None
    ctx: int
    chunks: int
    tokens_scored: int
    ppl_base: float | None
    bridge: Mapping[str, float] | None
    note: str | None

    @classmethod
    def from_json(cls, data: Any, where: str) -> QualityReference:
        num = (int, float)
        ppl = _get(data, "ppl_base", num, where, optional=True)
        return cls(_get(data, "text", str, where), _get(data, "text_identity", str, where, optional=True),
                   _get(data, "ctx", int, where), _get(data, "chunks", int, where),
                   _get(data, "tokens_scored", int, where), float(ppl) if ppl is not None else None,
                   _get(data, "bridge", Mapping, where, optional=True), _get(data, "note", str, where, optional=True))


@dataclass(frozen=True)
class ExpertCoverage:
    """A mixture of experts' calibration coverage: per layer, the calibration tokens each expert
    got (``layers``: (layer, tokens per expert)), counted by ``source`` (the importance matrix,
    or the backend's per-module sample counts) for the artifacts of ``format``; ``below`` experts
    got fewer than ``min_tokens``."""

    source: str
    min_tokens: int
    below: int
    layers: tuple[tuple[int, tuple[int, ...]], ...]
    summary: str
    format: str = ""  # the format whose calibration was counted ("": a result from before it was said)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "source": self.source, "min_tokens": self.min_tokens, "below": self.below,
                "summary": self.summary,
                "layers": [{"layer": layer, "tokens": list(tokens)} for layer, tokens in self.layers]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ExpertCoverage:
        layers = tuple((int(_get(x, "layer", int, f"{where}.layers")), tuple(int(t) for t in _get(x, "tokens", list, where)))
                       for x in _get(data, "layers", list, where))
        return cls(_get(data, "source", str, where), _get(data, "min_tokens", int, where), _get(data, "below", int, where),
                   layers, _get(data, "summary", str, where), _opt(data, "format", str, where) or "")

    @property
    def label(self) -> str:
        """Which artifacts and how: "GGUF (importance matrix)"."""
        return f"{self.format.upper()} ({self.source})" if self.format else self.source

    def rows(self) -> list[tuple[str, ...]]:
        """Per layer: experts, the least / median / most tokens an expert got, how many are short."""
        out: list[tuple[str, ...]] = []
        for layer, tokens in self.layers:
            ordered = sorted(tokens)
            short = sum(1 for t in tokens if t < self.min_tokens)
            out.append((str(layer), str(len(tokens)), f"{ordered[0]:,}", f"{ordered[len(ordered) // 2]:,}",
                        f"{ordered[-1]:,}", str(short)))
        return out


COVERAGE_COLUMNS = ("layer", "experts", "fewest tokens", "median", "most", "under the minimum")


@dataclass(frozen=True)
class RunResult:
    """The result of a run: the ``--json`` document (schema qwrap.result/2) and result.json."""

    qwrap_version: str
    model: Source
    llama_cpp_commit: str
    request: Mapping[str, Any]  # Request.to_json(), as the run was asked for
    command: tuple[str, ...]  # the `qwrap run` command that made it (token never included)
    artifacts: tuple[Artifact, ...]
    quality_reference: QualityReference | None
    calibration: CalibrationUse
    steps: tuple[StepRow, ...]
    warnings: tuple[str, ...]
    complete: bool = True  # False for a --step run, which applies no gates
    push: Mapping[str, Any] | None = None  # what `--push-to` did (hub_upload.PushResult.to_json())
    expert_coverage: ExpertCoverage | None = None  # a mixture of experts: the first format's tokens per expert
    expert_coverages: tuple[ExpertCoverage, ...] = ()  # ... and every format's, as each format counted them
    projector: Projector | None = None  # a vision model's projector file (mmproj), beside the text files

    @property
    def base_model(self) -> str | None:
        """What the Hub's ``base_model`` may hold: a Hub repo id (--base-model, or the source's),
        never a local folder name."""
        return self.request.get("base_model") or self.model.repo_id

    @property
    def output(self) -> Path:
        """The output folder as the run knew it (artifact paths are under it)."""
        return Path(str(self.request.get("output", "")))

    @property
    def failed_gates(self) -> tuple[Artifact, ...]:
        """The artifacts measured over their --max-kld limit; none for a --step run, whose
        artifacts may be made before their measurement (the run that ends the plan decides)."""
        return tuple(a for a in self.artifacts if a.gate == "failed") if self.complete else ()

    def raise_for_gates(self) -> None:
        failed = self.failed_gates
        if failed:
            limits = "its --target-kld" if all(a.budget and a.budget.kld_limit is not None for a in failed) else \
                "the --max-kld limit"
            raise QualityGateError(f"{', '.join(a.name for a in failed)} measured over {limits}",
                                   hint="The artifacts are kept and marked \"gate\": \"failed\" in the result and "
                                   "the model card; a higher-bit type, an --imatrix, or a looser limit would pass.")

    def exit_code(self) -> int:
        return QualityGateError.exit_code if self.failed_gates else 0

    def with_base_model(self, base_model: str) -> RunResult:
        return dataclasses.replace(self, request={**self.request, "base_model": base_model})

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "qwrap_version": self.qwrap_version,
            "model": dataclasses.asdict(self.model),
            "toolchain": {"llama_cpp_commit": self.llama_cpp_commit},
            "request": dict(self.request),
            "command": list(self.command),
            "artifacts": [a.to_json() for a in self.artifacts],
            "quality_reference": _plain(self.quality_reference),
            "calibration": dataclasses.asdict(self.calibration),
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "warnings": list(self.warnings),
            "complete": self.complete,
            "push": dict(self.push) if self.push is not None else None,
            "expert_coverage": self.expert_coverage.to_json() if self.expert_coverage is not None else None,
            "expert_coverages": [c.to_json() for c in self.expert_coverages],
            "projector": dataclasses.asdict(self.projector) if self.projector is not None else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> RunResult:
        """The result from its JSON document; SchemaError names the first field that is wrong."""
        schema = _get(data, "schema", str, "result")
        if schema != RESULT_SCHEMA:
            raise SchemaError(f"its schema is {schema!r}, and this qwrap reads {RESULT_SCHEMA!r}")
        ref = _get(data, "quality_reference", Mapping, "result", optional=True)
        coverage = _opt(data, "expert_coverage", Mapping, "result")
        first = ExpertCoverage.from_json(coverage, "expert_coverage") if coverage is not None else None
        every = tuple(ExpertCoverage.from_json(c, f"expert_coverages[{i}]")
                      for i, c in enumerate(_opt(data, "expert_coverages", list, "result") or []))
        projector = _opt(data, "projector", Mapping, "result")
        return cls(
            qwrap_version=_get(data, "qwrap_version", str, "result"),
            model=Source.from_json(_get(data, "model", Mapping, "result"), "model"),
            llama_cpp_commit=_get(_get(data, "toolchain", Mapping, "result"), "llama_cpp_commit", str, "toolchain"),
            request=_get(data, "request", Mapping, "result"),
            command=tuple(str(w) for w in _get(data, "command", list, "result")),
            artifacts=tuple(Artifact.from_json(a, f"artifacts[{i}]")
                            for i, a in enumerate(_get(data, "artifacts", list, "result"))),
            quality_reference=QualityReference.from_json(ref, "quality_reference") if ref is not None else None,
            calibration=CalibrationUse.from_json(_get(data, "calibration", Mapping, "result"), "calibration"),
            steps=tuple(StepRow.from_json(s, f"steps[{i}]") for i, s in enumerate(_get(data, "steps", list, "result"))),
            warnings=tuple(str(w) for w in _get(data, "warnings", list, "result")),
            complete=_get(data, "complete", bool, "result"),
            push=_get(data, "push", Mapping, "result", optional=True),
            expert_coverage=first,
            expert_coverages=every or ((first,) if first is not None else ()),  # a result from before: the one it kept
            projector=Projector.from_json(projector, "projector") if projector is not None else None,
        )


def _plain(value: Any) -> Any:
    if value is None:
        return None
    doc = dataclasses.asdict(value)
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in doc.items()}


# -- result.json ----------------------------------------------------------------------------


def save(output: Path, result: RunResult) -> Path:
    """``OUT/.checkpoint/result.json``, replaced whole (never half-written)."""
    path = checkpoint_dir(output) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(RESULT_FILE + ".tmp")
    staging.write_text(json.dumps(result.to_json(), indent=1))
    os.replace(staging, path)
    return path


def load(output: Path) -> RunResult:
    """The result of the last finished run in ``output``, checked; a clear error otherwise."""
    path = checkpoint_dir(output) / RESULT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{output} holds no finished qwrap run",
                         hint="Pass the --output folder of a `qwrap run` that succeeded.") from None
    try:
        return RunResult.from_json(doc)
    except SchemaError as exc:
        raise UsageError(f"{path} is not a result this qwrap can read: {exc}",
                         hint="Run the same `qwrap run` again: every step is reused and the result rewritten.") from None


# -- building it, once ----------------------------------------------------------------------


def _artifact(summary: StepSummary, by_id: Mapping[str, StepSummary], outcome: RunOutcome, chat: bool,
              gates: Gates) -> Artifact:
    step = summary.step
    fmt = FORMATS[step.format]
    parts = [by_id[s.id] for s in producer_chain(step, outcome.plan) if s.id in by_id]
    record = summary.record
    out: Mapping[str, Any] = record.outputs[0] if record and record.outputs else {}
    inputs = {role: by_id[i].facts for role, i in step.inputs if i in by_id}
    readers = {s.kind: by_id[s.id].facts for s in outcome.plan.consumers(step.id) if s.id in by_id}
    own = fmt.result_fields(summary.facts, inputs, readers)
    relative = str(out.get("path", step.outputs[0]))
    quality = own.get("quality")
    quant = step.param("quant")
    bpw = own.get("bits_per_weight")
    q = Quality.from_json(quality, f"{step.id} quality") if quality is not None else None
    recipe, budget = own.get("recipe"), own.get("budget")
    found = Budget.from_json(budget, f"{step.id} budget") if budget is not None else None
    verdict = gates.verdict(step.format, quant, q.kld_mean if q else None)
    if found is not None and found.kld_limit is not None:  # --target-kld: checked on the measured figure
        kld = q.kld_mean if q is not None else None
        verdict = "failed" if kld is None or kld > found.kld_limit or verdict == "failed" else "passed"
    return Artifact(
        format=step.format, quant=quant, path=str(outcome.request.output / relative),
        bytes=own.get("bytes", out.get("bytes")), sha256=own.get("sha256", out.get("sha256")),
        bits_per_weight=float(bpw) if bpw is not None else None,
        validated=bool(summary.facts.get("validated")), quality=q,
        gate=verdict,
        seconds=round(sum((p.record.seconds or 0.0) if p.record else 0.0 for p in parts), 3),
        peak_rss_bytes=max((p.record.peak_rss_bytes if p.record else 0) for p in parts),
        peak_gpu_bytes=max((p.record.peak_gpu_bytes if p.record else 0) for p in parts),
        reused=summary.state is StepState.SKIPPED, calibration=own.get("calibration"),
        trust_remote_code=bool(own.get("trust_remote_code")), library=fmt.LIBRARY,
        usage=fmt.card_usage([relative], chat=chat),
        shards=tuple(Shard(str(s["path"]), int(s["bytes"]), str(s["sha256"])) for s in own.get("shards") or ()),
        recipe=RecipeRef.from_json(recipe, f"{step.id} recipe") if recipe is not None else None,
        fallbacks=tuple(Fallback.from_json(f, f"{step.id} fallbacks") for f in own.get("fallbacks") or ()),
        planned_bits_per_weight=_float(own.get("planned_bits_per_weight")),
        budget=found,
    )


def _quality_reference(outcome: RunOutcome) -> QualityReference | None:
    ev = outcome.model.evaluation
    if ev is None:
        return None
    # the step that provides the evaluation's token ids measured the 16-bit reference
    base = next((s.facts for s in outcome.summaries if any(p.startswith("eval-tokens") for p in s.step.provides)), {})
    chunks = int(base.get("chunks", ev.chunks))
    return QualityReference(ev.label, ev.identity, ev.ctx, chunks, chunks * (ev.ctx - 1 - ev.ctx // 2),
                            base.get("ppl_base"), _bridge(outcome, base), ev.note or None)


def _bridge(outcome: RunOutcome, base: Mapping[str, Any]) -> dict[str, float] | None:
    """How far the two runtimes' references differ on the same tokens: the 16-bit GGUF in
    llama.cpp against the source model in transformers (each row's ppl_base)."""
    llama = base.get("ppl_base")
    views = [v for s in outcome.summaries for v in (s.facts.get("quality"), s.facts.get("weights"))
             if isinstance(v, dict)]
    torch_side = next((v.get("ppl_base") for v in views if v.get("runtime") == "transformers"), None)
    if llama is None or torch_side is None:
        return None
    return {"llama_cpp_16bit_ppl": llama, "transformers_source_ppl": torch_side,
            "relative_difference": (llama - torch_side) / torch_side}


def _calibration(outcome: RunOutcome) -> CalibrationUse:
    calib = outcome.model.calibration
    if calib is not None:
        return CalibrationUse("used", calib.label)
    if outcome.calibration_note:
        return CalibrationUse("missing", note=outcome.calibration_note)
    return CalibrationUse("not needed")


def build_result(outcome: RunOutcome) -> RunResult:
    by_id = {s.step.id: s for s in outcome.summaries}
    src = outcome.model.source
    chat = chat_template(src.path) is not None
    gates = parse_gates(outcome.request.max_kld)
    # a --step run reports the deliverables that are done; the others are other processes' business
    done = [s for s in outcome.summaries
            if s.step.deliverable and s.record is not None and s.record.state is StepState.DONE]
    artifacts = tuple(_artifact(s, by_id, outcome, chat, gates) for s in done if PROJECTOR not in s.step.provides)
    # each format's own count (GGUF: the importance matrix; AWQ/GPTQ: the backend's samples)
    coverages = tuple(dataclasses.replace(ExpertCoverage.from_json(s.facts["expert_coverage"], s.step.id),
                                          format=s.step.format)
                      for s in outcome.summaries if isinstance(s.facts.get("expert_coverage"), Mapping))
    return RunResult(
        qwrap_version=__version__,
        model=Source(outcome.request.model, src.name, str(src.path), src.repo_id, src.revision, chat),
        llama_cpp_commit=read_pin().commit,
        request=json.loads(json.dumps(outcome.request.to_json())),  # JSON-plain: it round-trips
        command=tuple(outcome.command or safe_argv()),
        artifacts=artifacts,
        quality_reference=_quality_reference(outcome),
        calibration=_calibration(outcome),
        steps=tuple(StepRow(s.step.id, s.state.value, s.step.fingerprint,
                            s.record.seconds if s.record else None,
                            s.record.peak_rss_bytes if s.record else None,
                            s.record.peak_gpu_bytes if s.record else None) for s in outcome.summaries),
        warnings=tuple(outcome.warnings),
        complete=outcome.complete,
        expert_coverage=coverages[0] if coverages else None,
        expert_coverages=coverages,
        projector=next((_projector(s, outcome) for s in done if PROJECTOR in s.step.provides), None),
    )


def _projector(summary: StepSummary, outcome: RunOutcome) -> Projector:
    """The projector's row: its step's facts (file, type, the text file it was loaded with, the
    usage text) and the file as the journal recorded it."""
    facts = summary.facts.get(PROJECTOR) or {}
    record = summary.record
    out: Mapping[str, Any] = record.outputs[0] if record and record.outputs else {}
    relative = str(out.get("path", summary.step.outputs[0]))
    return Projector(format=summary.step.format, path=str(outcome.request.output / relative),
                     type=str(facts.get("type", "")), bytes=int(out.get("bytes", 0)), sha256=str(out.get("sha256", "")),
                     validated=bool(summary.facts.get("validated")), validated_with=str(facts.get("validated_with", "")),
                     projector_type=facts.get("projector_type"), usage=str(facts.get("usage", "")))


def labels(artifacts: Sequence[Artifact]) -> list[str]:
    """Each artifact's label: its type, with the format in front where two formats share a type."""
    plain = [str(a.quant) if a.quant else Path(a.path).name for a in artifacts]
    formats: dict[str, set[str]] = {}
    for label, a in zip(plain, artifacts, strict=True):
        formats.setdefault(label, set()).add(a.format)
    return [f"{a.format.upper()} {label}" if len(formats[label]) > 1 else label
            for label, a in zip(plain, artifacts, strict=True)]


# -- size budgets, as every renderer shows them -------------------------------------------

BUDGET_COLUMNS = ("budget", "searched: size", "KLD (mean)", "stock type", "its size", "its KLD (mean)",
                  "searched vs stock", "shipped")


def budget_rows(result: RunResult) -> list[tuple[str, ...]]:
    """One row per ``--target-*`` artifact (``BUDGET_COLUMNS``): the searched file beside the
    stock type nearest its size, measured on the same tokens, and which one shipped; the card,
    the page and the terminal all show these."""
    kld = figure("kld_mean")
    rows: list[tuple[str, ...]] = []
    for a in result.artifacts:
        b = a.budget
        if b is None:
            continue
        stock, mine = b.stock, b.searched
        rows.append((b.target, human_bytes(mine.bytes), kld.text(mine.quality),
                     stock.quant if stock else "not compared (--no-compare)",
                     human_bytes(stock.bytes) if stock else "-", kld.text(stock.quality) if stock else "-",
                     b.difference() or "-",
                     "searched" + (f" ({a.recipe.rules} rules)" if a.recipe is not None else "") if b.chosen == "searched"
                     else f"stock {stock.quant if stock else ''}".strip()))
    return rows
