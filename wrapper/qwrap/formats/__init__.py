"""The formats, one module (or package) each with the same shape, registered in one dict.

Like pre-commit's languages: each module owns everything about its format - its option
group, option validation, its steps and their estimates, its checks, its actions and worker
payloads, its rows in the plan, the result and the model card - and the ``Format`` Protocol
(formats/base.py) lets the type checker verify every one. Nothing outside ``formats/``,
``workers/`` and this registry names a format: adding one is a module, its worker, its lock
and a line here (docs/architecture.md says how). Format modules import from ``base``, never
from this registry, which imports them all.
"""

from __future__ import annotations

from . import awq, gguf, gptq
from .base import Format, producer_chain

__all__ = ["FORMATS", "Format", "producer_chain"]

FORMATS: dict[str, Format] = {"gguf": gguf, "awq": awq, "gptq": gptq}
