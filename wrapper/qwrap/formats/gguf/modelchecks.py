"""GGUF's model checks before heavy work: the pinned converter knows the architecture, and
(for `plan`) a vocab-only conversion, seconds without weights, accepts the tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ...checks import Check
from ...children import run_checked
from ...envs import find_env
from ...errors import QwrapError, UnsupportedModelError
from ...model import ModelInfo
from ...toolchain import cache_root, find_toolchain, supported_architectures
from .declaration import Options


def checks(o: Options, model: ModelInfo, *, thorough: bool) -> list[Check]:
    found = [_architecture_check(model)]
    if thorough and found[0].ok:
        found.append(_tokenizer_check(model))
    return found


def _unsupported(arch: str | None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"architecture {arch} is not supported by the pinned llama.cpp converter",
        hint="`qwrap formats --architectures` lists what is; a newer llama.cpp may add it "
        "(QWRAP_LLAMA_CPP_DIR).",
    )


def _architecture_check(model: ModelInfo) -> Check:
    arch = model.architecture
    try:
        supported = supported_architectures()
    except QwrapError as exc:  # an unreadable registry is not a refusal: the converter will say
        return Check("architecture", False, f"cannot read the converter's list: {exc.message}")
    ok = arch in supported
    return Check("architecture", ok, f"{arch} is {'' if ok else 'not '}supported by the pinned converter",
                 None if ok else _unsupported(arch))


def _tokenizer_check(model: ModelInfo) -> Check:
    """A vocab-only conversion (seconds, no weights needed) catches tokenizers the pinned
    converter rejects, such as unknown BPE pre-tokenizers, before hours of work."""
    try:
        converter = find_toolchain().converter
        python = find_env("convert").python
    except QwrapError as exc:
        return Check("tokenizer", False, f"not checked: {exc.message}")
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"vocab-check-{model.source.name}.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwrap-vocab-") as tmp:
        try:
            run_checked([python, converter, model.source.path, "--vocab-only", "--outfile", Path(tmp) / "v.gguf"],
                        what="vocab-only conversion", log_path=log, timeout=600)
        except QwrapError as exc:
            return Check("tokenizer", False, exc.message, exc)
    return Check("tokenizer", True, "the pinned converter accepts the tokenizer")
