"""PlanBuilder's fingerprint chaining, in-process: a step's fingerprint covers its kind, params,
outputs, the toolchain pin and its inputs' fingerprints (the source's for a step with none), so a
change re-runs exactly that step and everything downstream of it, never its siblings."""

from __future__ import annotations

from typing import Any

import pytest

from qwrap.plan import Estimate, PlanBuilder, Step


def chain(*, source: str = "src", pin: str = "pin", params: dict[str, dict[str, Any]] | None = None,
          outputs: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """root -> mid -> leaf, root -> sibling, and other (reads nothing)."""
    p, o = params or {}, outputs or {}
    b = PlanBuilder(source, pin)

    def add(step_id: str, inputs: dict[str, str] | None = None) -> None:
        b.add(step_id, f"k.{step_id}", "f", step_id, inputs=inputs, params=p.get(step_id, {"n": 1}),
              outputs=o.get(step_id, (f"{step_id}.out",)))

    add("root")
    add("mid", {"in": "root"})
    add("leaf", {"in": "mid"})
    add("sibling", {"in": "root"})
    add("other")
    return {s.id: s.fingerprint for s in b.steps}


def changed(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in a if a[k] != b[k]}


BASE = chain()


def test_fingerprints_are_deterministic_and_distinct() -> None:
    assert chain() == BASE
    assert len(set(BASE.values())) == len(BASE)


def test_a_params_change_reaches_the_step_and_everything_downstream_not_its_siblings() -> None:
    assert changed(BASE, chain(params={"mid": {"n": 2}})) == {"mid", "leaf"}
    assert changed(BASE, chain(params={"root": {"n": 2}})) == {"root", "mid", "leaf", "sibling"}
    assert changed(BASE, chain(params={"leaf": {"n": 2}})) == {"leaf"}
    assert changed(BASE, chain(params={"mid": {"n": 1, "extra": None}})) == {"mid", "leaf"}


def test_params_order_does_not_matter_their_values_do() -> None:
    one = chain(params={"mid": {"a": 1, "b": 2}})
    assert chain(params={"mid": {"b": 2, "a": 1}}) == one
    assert changed(one, chain(params={"mid": {"a": 1, "b": 3}})) == {"mid", "leaf"}


def test_an_outputs_change_is_a_fingerprint_change() -> None:
    assert changed(BASE, chain(outputs={"mid": ("renamed.out",)})) == {"mid", "leaf"}


def test_the_source_reaches_only_steps_that_read_nothing_and_their_readers() -> None:
    assert changed(BASE, chain(source="other-src")) == set(BASE)


def test_the_toolchain_pin_reaches_every_step() -> None:
    assert changed(BASE, chain(pin="other-pin")) == set(BASE)


def test_a_step_with_an_input_does_not_depend_on_the_source_directly() -> None:
    b1, b2 = PlanBuilder("src-1", "pin"), PlanBuilder("src-2", "pin")
    for b in (b1, b2):  # the same input fingerprint by construction: a step fed from elsewhere
        b.steps.append(Step("up", "k", "f", "up", (), (), (), "same-fp"))
        b.add("down", "k.down", "f", "down", inputs={"in": "up"})
    assert b1.steps[1].fingerprint == b2.steps[1].fingerprint


def test_the_kind_and_the_input_fingerprints_are_part_of_it() -> None:
    b = PlanBuilder("src", "pin")
    one = b.add("one", "k.one", "f", "one")
    two = b.add("two", "k.two", "f", "two")
    x = b.add("x", "k.x", "f", "x", inputs={"in": one.id})
    y = b.add("y", "k.x", "f", "y", inputs={"in": two.id})
    assert one.fingerprint != two.fingerprint and x.fingerprint != y.fingerprint


def test_a_step_is_a_complete_value() -> None:
    b = PlanBuilder("src", "pin", parameters=1234)
    up = b.add("up", "k.up", "f", "up", outputs=("a.partial",))
    s = b.add("s", "k.s", "f", "label", inputs={"model": up.id}, outputs=("a",), params={"q": "Q4", "t": 2},
              files={"calib": "/x/calib.txt"}, estimate=Estimate(1, 2, 3, 4.0), deliverable=True, threaded=True,
              exclusive="gpu", provides=("tokens",), gpu=True, scratch=(".checkpoint/layers/s-{fingerprint}",))
    assert s.input_ids == ("up",) and s.input_id("model") == "up" and s.input_id("other") is None
    assert s.param("q") == "Q4" and s.param("missing", 7) == 7 and s.file("calib") == "/x/calib.txt"
    assert s.scratch == (f".checkpoint/layers/s-{s.fingerprint[:12]}",)
    assert b.provider("tokens") is s and b.provider("nothing") is None
    plan = b.plan()
    assert plan.parameters == 1234 and [c.id for c in plan.consumers("up")] == ["s"]
    data = s.to_json()
    assert data["inputs"] == {"model": "up"} and data["params"] == {"q": "Q4", "t": 2}
    assert data["estimates"] == {"output_bytes": 1, "peak_ram_bytes": 2, "peak_disk_bytes": 3, "seconds": 4.0}


def test_plan_totals() -> None:
    b = PlanBuilder("src", "pin")
    b.add("a", "k", "f", "a", estimate=Estimate(10, 100, 10, 1.0))
    b.add("b", "k", "f", "b", inputs={"in": "a"}, estimate=Estimate(5, 300, 5, None), deliverable=True)
    b.add("c", "k", "f", "c", inputs={"in": "a"}, estimate=Estimate(7, 200, 7, 2.5), deliverable=True)
    assert b.plan().totals() == {"steps": 3, "output_bytes": 12, "peak_disk_bytes": 22, "peak_ram_bytes": 300,
                                 "seconds": 3.5}
    assert PlanBuilder("src", "pin").plan().totals()["seconds"] is None


def test_an_input_must_already_be_in_the_plan_and_ids_are_unique() -> None:
    b = PlanBuilder("src", "pin")
    with pytest.raises(ValueError, match="not in the plan"):
        b.add("x", "k", "f", "x", inputs={"in": "later"})
    b.add("x", "k", "f", "x")
    with pytest.raises(ValueError, match="two steps with id x"):
        b.add("x", "k", "f", "x")
