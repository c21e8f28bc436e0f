"""Calibration / held-out samples: text file -> ``[n_samples, seq_len]`` token ids, cached.

Sampling (SAMPLING_VERSION): split the text into documents, keep the requested portion
(every 10th document is held out for validation), shuffle the documents with ``seed``,
tokenize them in that order (each followed by a blank line) until there are enough tokens,
then cut consecutive windows, each starting with BOS when the tokenizer has one. The
result is cached in ``cache_dir`` as safetensors, keyed by the tokenizer files, the text's
hash and the parameters, so repeated runs skip tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwrap.workers.protocol import TextSource
from qwrap.workers.runtime import WorkerError, warn

if TYPE_CHECKING:
    import torch

SAMPLING_VERSION = 1
HELD_OUT_EVERY = 10
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class Samples:
    ids: torch.Tensor  # int64 [n_samples, seq_len]
    metadata: dict[str, Any]  # deterministic: goes into the artifact
    cache_hit: bool

    def as_lists(self) -> list[list[int]]:
        return [row.tolist() for row in self.ids]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def read_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkerError("bad_job", f"cannot read calibration text {path}: {exc}",
                          hint="Pass --calib with a UTF-8 .txt or .jsonl file.") from exc
    if path.suffix == ".jsonl":
        docs = [_jsonl_text(line, path) for line in text.splitlines() if line.strip()]
    else:
        docs = [block.strip() for block in text.replace("\r\n", "\n").split("\n\n")]
    return [doc for doc in docs if doc]


def _jsonl_text(line: str, path: Path) -> str:
    try:
        value = json.loads(line).get("text")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str):
        raise WorkerError("bad_job", f"{path}: every .jsonl line must be an object with a 'text' string")
    return value


def portion(docs: list[str], which: str) -> list[str]:
    if len(docs) < HELD_OUT_EVERY:
        warn(f"only {len(docs)} documents in the text: calibration and held-out text overlap")
        return docs
    held_out = which == "held_out"
    return [d for i, d in enumerate(docs) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]


def sample_ids(tokenizer: Any, docs: list[str], spec: TextSource) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    body = spec.seq_len - (1 if bos is not None else 0)
    need = spec.n_samples * body
    order = list(range(len(docs)))
    random.Random(spec.seed).shuffle(order)
    stream: list[int] = []
    for start in range(0, len(order), 64):
        batch = [docs[i] + "\n\n" for i in order[start : start + 64]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
        if len(stream) >= need:
            break
    if len(stream) < body:
        raise WorkerError("bad_job", f"the text has {len(stream)} tokens, fewer than one "
                          f"{spec.seq_len}-token sample", hint="Use a longer text or --calib-seq-len.")
    if len(stream) < need:
        warn(f"the text has {len(stream)} tokens for {spec.n_samples} samples of {spec.seq_len}: "
             "samples repeat text")
        stream = (stream * (need // len(stream) + 1))[:need]
    prefix = [bos] if bos is not None else []
    return [prefix + stream[k * body : (k + 1) * body] for k in range(spec.n_samples)]


def load_samples(spec: TextSource, tokenizer: Any, tokenizer_dir: Path) -> Samples:
    import torch
    from safetensors.torch import load_file, save_file

    text = Path(spec.path)
    if not text.is_file():
        raise WorkerError("bad_job", f"calibration text not found: {text}")
    params = {"sampling": SAMPLING_VERSION, "tokenizer": tokenizer_sha256(tokenizer_dir),
              "text_sha256": file_sha256(text), "portion": spec.portion,
              "n_samples": spec.n_samples, "seq_len": spec.seq_len, "seed": spec.seed}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
    cached = Path(spec.cache_dir) / f"tokens-{key}.safetensors" if spec.cache_dir else None
    if cached is not None and cached.is_file():
        ids, hit = load_file(str(cached))["ids"], True
    else:
        docs = portion(read_documents(text), spec.portion)
        ids, hit = torch.tensor(sample_ids(tokenizer, docs, spec), dtype=torch.int64), False
        if cached is not None:
            _save_atomic(cached, lambda tmp: save_file({"ids": ids}, str(tmp)))
    meta = {**params, "source": spec.source or text.name,
            "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    return Samples(ids=ids, metadata=meta, cache_hit=hit)


def _save_atomic(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
