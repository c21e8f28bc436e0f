"""The fast tier stays toolchain-free: every collected test that asks (directly or through another
fixture) for the llama.cpp build, the converter environment or a model it builds is marked
``slow`` or ``backend``, so `make test-fast` (``-m "not slow and not backend and not heavy"``)
never waits for a conversion, and `make test` still runs it."""

from __future__ import annotations

import pytest

NEEDS_A_TOOLCHAIN = {"toolchain", "convert_python", "tiny_model", "trained_model"}


def test_every_test_that_needs_a_toolchain_is_marked_slow_or_backend(request: pytest.FixtureRequest) -> None:
    unmarked = [item.nodeid for item in request.session.items
                if NEEDS_A_TOOLCHAIN & set(getattr(item, "fixturenames", ()))
                and not any(item.get_closest_marker(m) for m in ("slow", "backend"))]
    assert unmarked == [], "mark these @pytest.mark.slow (they need `make llama`/`make envs`)"


def test_the_fast_tier_marker_is_registered(pytestconfig: pytest.Config) -> None:
    names = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert {"slow", "backend", "heavy", "gpu"} <= names
