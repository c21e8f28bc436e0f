"""The options AWQ and GPTQ share: their common option group and options value, which awq.py
and gptq.py extend with their own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from ..options import Option

COMMON_OPTIONS = (
    Option("bits", int, 4, "AWQ/GPTQ bits (AWQ: 4; GPTQ: 2, 3, 4 or 8)."),
    Option("group_size", int, 128, "AWQ/GPTQ group size; must divide the layer widths."),
    Option("calib_samples", int, 128, "AWQ/GPTQ calibration samples."),
    Option("calib_seq_len", int, 512, "AWQ/GPTQ calibration sequence length (tokens)."),
    Option("device", str, "auto", "AWQ/GPTQ device: auto (CUDA when present), cpu or cuda."),
    Option("min_expert_tokens", int, 16, "MoE models: warn when an expert of a layer got fewer calibration tokens "
           "than this.", metavar="N"),
    Option("strict_coverage", bool, False, "MoE models: fail when an expert got fewer than --min-expert-tokens."),
    Option("moe_routing", str, "routed", "MoE models, gptqmodel: routed (each token calibrates the experts the "
           "router picks, as in use) or all (every token calibrates every expert: no expert left without samples, "
           "at the cost of a forward pass per expert).", metavar="routed|all"),
    Option("trust_remote_code", bool, False, "AWQ/GPTQ: run the model's own Python code (config.json auto_map, "
           "its modeling_*.py) in the backend workers. Off by default: only for models whose code you trust."),
)


@dataclass(frozen=True)
class Common:
    """The options AWQ and GPTQ share; each format's Options extends it."""

    FORMAT: ClassVar[str] = ""  # the format's name (each format's Options sets it)
    backend: str
    bits: int = 4
    group_size: int = 128
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False
    min_expert_tokens: int = 16  # MoE: an expert with fewer calibration samples is reported
    strict_coverage: bool = False  # ... and fails the quantize step
    moe_routing: str = "routed"  # MoE calibration: "routed" as the router picks, or "all" experts (gptqmodel)


OptionsT = TypeVar("OptionsT", bound=Common)


def make(cls: type[OptionsT], values: Mapping[str, Any], backend: str) -> OptionsT:
    names = {f.name for f in fields(cls)} - {"backend"}
    return cls(backend=backend, **{k: v for k, v in values.items() if k in names})


def from_json(cls: type[OptionsT], data: Mapping[str, Any], default_backend: str) -> OptionsT:
    names = {f.name for f in fields(cls)}
    return cls(**{"backend": default_backend, **{k: v for k, v in data.items() if k in names}})
