"""qwrap: Hugging Face causal LM -> validated GGUF, AWQ and GPTQ artifacts."""

from __future__ import annotations

__version__ = "0.1.0"
