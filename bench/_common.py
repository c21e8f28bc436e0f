"""What the benchmarks share: an offline model built with the converter environment's Python,
and results written as JSON under bench/results/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "wrapper"))

from qwrap import envs  # noqa: E402


def build_model(folder: Path, *args: str) -> Path:
    """A model made offline by scripts/make-tiny-model (e.g. "--params-100m")."""
    python = envs.find_env("convert").python
    subprocess.run([str(python), str(REPO / "scripts" / "make-tiny-model"), str(folder), *args],
                   check=True, stdout=subprocess.DEVNULL)
    return folder


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
