"""What planning knows about the model and the calibration data, read from headers only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .evaltext import Evaluation
from .hub import parameter_counts
from .journal import fingerprint_tree
from .modelfiles import ModelSource, check_dtypes, verify


def _json_key(path: Path, key: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def chat_template(folder: Path) -> str | None:
    """The source's chat template in the pinned converter's order (gguf-py's SpecialVocab):
    tokenizer_config.json's chat_template, else chat_template.jinja, else chat_template.json;
    named templates give the default one (the one ``tokenizer.chat_template`` holds)."""
    value = _json_key(folder / "tokenizer_config.json", "chat_template")
    if value is None and (folder / "chat_template.jinja").is_file():
        value = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif value is None:
        value = _json_key(folder / "chat_template.json", "chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


MiB = 1 << 20
BYTES_PER_DTYPE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1, "U8": 1}


@dataclass(frozen=True)
class Shape:
    """What the estimates need from config.json and the safetensors headers."""

    parameters: int
    vocab_embed: int  # vocab * hidden (token embedding)
    output: int  # vocab * hidden unless tied
    norms: int  # 1-D weights (kept in F32 by llama.cpp)
    weight_bytes: int  # the source weights on disk
    vocab: int = 0
    main_dtype: str | None = None  # the dtype most parameters have ("BF16", "F16", ...)
    largest_tensor: int = 0  # elements of the biggest matrix (tools convert one tensor at a time)

    @property
    def metadata_bytes(self) -> int:
        """GGUF header: mostly the vocabulary (token text, score, type)."""
        return self.vocab * 32 + 32 * 1024


@dataclass(frozen=True)
class Calibration:
    """The calibration text: its identity goes into fingerprints, its path to the steps. At
    plan time the default (WikiText-2) may not be downloaded yet: then ``path`` is None."""

    identity: str  # "sha256:<hex>" of a user file, or the dataset file's name
    label: str  # for the model card: the file name, or "wikitext2"
    path: str | None


@dataclass(frozen=True)
class ModelInfo:
    source: ModelSource
    config: dict[str, Any]
    shape: Shape
    calibration: Calibration | None = None
    evaluation: Evaluation | None = None  # None: --no-eval

    @property
    def fingerprint(self) -> str:
        """A Hub model is its resolved commit (the same whether or not the weights are here yet);
        a local folder is its files' names, sizes and contents/mtimes."""
        src = self.source
        if src.repo_id is not None and src.revision:
            return f"hub:{src.repo_id}@{src.revision}"
        return fingerprint_tree(src.path)

    @property
    def architecture(self) -> str | None:
        return (self.config.get("architectures") or [None])[0]

    @property
    def vision_tower(self) -> bool:
        return vision_tower(self.config)


def vision_tower(config: dict[str, Any]) -> bool:
    """The checkpoint has a vision tower: config.json has a ``vision_config``."""
    return isinstance(config.get("vision_config"), dict)


def model_shape(source: ModelSource, config: dict[str, Any], token: str | None = None) -> Shape:
    counts = parameter_counts(source, token=token)
    check_dtypes(source, counts)
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size", 0) or 0)
    vocab = int(text.get("vocab_size", 0) or 0)
    layers = int(text.get("num_hidden_layers", 0) or 0)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    weight_bytes = sum(n * BYTES_PER_DTYPE.get(d, 2) for d, n in counts.items())
    main = max(counts, key=lambda d: counts[d]) if counts else None
    ffn = int(text.get("intermediate_size", 0) or 0)
    return Shape(sum(counts.values()), vocab * hidden, 0 if tied else vocab * hidden,
                 (2 * layers + 1) * hidden, weight_bytes, vocab, main, max(vocab * hidden, ffn * hidden))


def model_info(source: ModelSource, calibration: Calibration | None, *, token: str | None = None,
               weights: bool = True) -> ModelInfo:
    """config.json and the safetensors headers checked first (modelfiles.verify: a broken file
    exits 20 naming it); ``weights=False``: a Hub model planned before its weights are here."""
    config = verify(source, weights=weights)
    return ModelInfo(source, config, model_shape(source, config, token), calibration)
