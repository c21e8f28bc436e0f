from __future__ import annotations

import re
from pathlib import Path

from qwrap.errors import ALL_ERRORS, Interrupted, QwrapError, UsageError, exit_code_for

README = Path(__file__).resolve().parents[1] / "README.md"


def test_exit_codes_unique() -> None:
    codes = [e.exit_code for e in ALL_ERRORS]
    assert len(codes) == len(set(codes))
    assert all(issubclass(e, QwrapError) for e in ALL_ERRORS)


def test_exit_codes_documented_in_readme() -> None:
    text = README.read_text()
    for err in ALL_ERRORS:
        assert re.search(rf"\|\s*{err.exit_code}\s*\|", text), f"{err.__name__} ({err.exit_code}) not in README"
    assert re.search(r"\|\s*143\s*\|", text)


def test_exit_code_for() -> None:
    assert exit_code_for(UsageError("x")) == 2
    assert exit_code_for(Interrupted(signum=15)) == 143
    assert exit_code_for(Interrupted(signum=2)) == 130
    assert exit_code_for(RuntimeError()) == 1
