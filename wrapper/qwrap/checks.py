"""A check made before heavy work: its outcome for `plan`, its error for `run`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import QwrapError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    error: QwrapError | None = None  # what `run` raises when the check fails

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def raise_first_failure(checks: list[Check]) -> None:
    for check in checks:
        if not check.ok and check.error is not None:
            raise check.error
