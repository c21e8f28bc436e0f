"""Per-layer checkpoints as safetensors + JSON (never pickle), for workers that drive the
layer loop themselves (autoawq).

``layer-00003.safetensors`` holds the tensors computed for layer 3, ``layer-00003.json``
the non-tensor state plus the fingerprint of the run and the sha256 of the tensor file.
The JSON is written last (temp file, fsync, rename), so a layer counts as done only when
both files are complete and agree. A fingerprint from other settings/model/calibration
means the checkpoints belong to another run: they are removed, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwrap.workers.runtime import warn

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


class LayerStore:
    def __init__(self, root: Path | None, fingerprint: str) -> None:
        self.root = root
        self.fingerprint = fingerprint
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            self._drop_foreign()

    def _paths(self, index: int) -> tuple[Path, Path]:
        assert self.root is not None
        stem = self.root / f"layer-{index:05d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def _drop_foreign(self) -> None:
        assert self.root is not None
        stale = [path for path in sorted(self.root.glob("layer-*.json")) if not self._ours(path)]
        if stale:
            warn(f"removing {len(stale)} layer checkpoints of a different run in {self.root}")
            for path in self.root.glob("layer-*"):
                path.unlink()

    def _ours(self, path: Path) -> bool:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return bool(record.get("fingerprint") == self.fingerprint
                    and record.get("format") == FORMAT_VERSION)

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The saved tensors and state of layer ``index``, or None if not (fully) saved."""
        if self.root is None:
            return None
        tensor_path, record_path = self._paths(index)
        if not (tensor_path.is_file() and record_path.is_file() and self._ours(record_path)):
            return None
        record = json.loads(record_path.read_text())
        data = tensor_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            warn(f"layer checkpoint {tensor_path.name} is corrupt; recomputing layer {index}")
            return None
        from safetensors.torch import load

        return load(data), record["state"]

    def save(self, index: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        tensor_path, record_path = self._paths(index)
        record = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "index": index,
                  "sha256": hashlib.sha256(data).hexdigest(), "state": state}
        _write_atomic(tensor_path, data)
        _write_atomic(record_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        return record_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_fingerprint(model_dir: Path) -> dict[str, list[int | str]]:
    """Cheap identity of a model folder: config hash plus size and head/tail hash of every
    weight file (hashing whole multi-GB shards on every start would cost minutes)."""
    result: dict[str, list[int | str]] = {}
    for path in sorted(model_dir.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            result[path.name] = [path.stat().st_size, _head_tail_sha256(path)]
    return result


def _head_tail_sha256(path: Path, span: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        digest.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            digest.update(f.read(span))
    return digest.hexdigest()


def fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
