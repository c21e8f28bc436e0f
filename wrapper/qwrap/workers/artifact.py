"""Turn what a library saved into a standard, reproducible Hugging Face folder.

Libraries rewrite tokenizer files, tweak generation configs, log timings and record temp
paths; qwrap's artifact is the library's weights and config plus the *source's* tokenizer
and generation config unchanged, and nothing that differs between two runs of one job (so
a resumed run is byte-identical to an uninterrupted one).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwrap.workers.calib import TOKENIZER_FILES

if TYPE_CHECKING:
    import torch.nn

METADATA_FILE = "qwrap_metadata.json"


def sort_buffers(model: torch.nn.Module) -> None:
    """Give every module's parameters and buffers a fixed (sorted) order.

    A layer restored from a checkpoint registers its tensors in another order than a
    freshly quantized one, and save order follows registration order; sorting makes the
    state dict, and so the safetensors bytes and shard split, independent of that.
    """
    for module in model.modules():
        module._parameters = dict(sorted(module._parameters.items()))
        module._buffers = dict(sorted(module._buffers.items()))


def use_source_files(source: Path, out: Path) -> None:
    """The source's tokenizer files and generation config replace the library's."""
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    for code in sorted(source.glob("*.py")):  # a model's own code (--trust-remote-code): its config names it
        shutil.copyfile(code, out / code.name)


def edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    """Rewrite a JSON file through ``edit(data)``, keeping key order and 2-space indent."""
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_metadata(out: Path, metadata: dict[str, Any]) -> None:
    """Settings and calibration provenance, deterministic (no timings, no paths)."""
    text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / METADATA_FILE).write_text(text, encoding="utf-8")


def list_files(out: Path) -> list[str]:
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


def check_complete(out: Path) -> None:
    """A loadable HF folder has a config with quantization_config and weights."""
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" not in config:
        raise RuntimeError(f"{out}/config.json has no quantization_config")
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"{out} has no safetensors weights")
