"""Size budgets, in-process: parsing budgets, grouping tensors (dense and MoE), the allocation
within a budget or a KLD limit, which file ships (searched or stock, beyond the noise), and the
budget in the typed result and its renderers. The end-to-end runs are in test_budget.py."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from qwrap.errors import UsageError, ValidationFailedError
from qwrap.formats.gguf import search
from qwrap.formats.gguf.budget_actions import decide, nearest_stock
from qwrap.formats.gguf.budgets import Target, base_quant, parse_size, parse_targets
from qwrap.formats.gguf.ggmltypes import GGML_TYPES, aligned
from qwrap.formats.gguf.recipes import parse
from qwrap.quality import Quality
from qwrap.results import Artifact, Budget, Candidate, budget_rows

# -- budgets as the user writes them ----------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [("4.5G", 4_500_000_000), ("800MiB", 800 * 2**20), ("2036608", 2036608),
                                            ("3M", 3_000_000), ("1.5 GiB", int(1.5 * 2**30)), ("10k", 10_000)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("sizes", "bpws", "klds", "words"), [
    (["4.5X"], [], [], "--target-size '4.5X' is not a size"),
    (["0"], [], [], "must be more than 0 bytes"),
    ([], ["40"], [], "--target-bpw '40' is not a number between 1.5 and 16"),
    ([], ["nan"], [], "--target-bpw 'nan'"),
    ([], [], ["-0.1"], "--target-kld '-0.1' is not a number between 0 and 10"),
])
def test_bad_budgets_are_refused_naming_the_option(sizes: list[str], bpws: list[str], klds: list[str],
                                                   words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(".", r"\.")):
        parse_targets(sizes, bpws, klds)


def test_targets_keys_labels_and_base_mix() -> None:
    targets = parse_targets(["4.5G"], ["4.8", "4.8"], ["0.01"])  # a repeated budget is one budget
    assert [t.key for t in targets] == ["size=4500000000", "bpw=4.8", "kld=0.01"]
    assert [t.label for t in targets] == ["size-4.5G", "bpw-4.8", "kld-0.01"]
    assert all(Target.from_key(t.key) == t for t in targets)
    assert targets[1].budget_bytes(1_000_000) == 600_000 and targets[2].budget_bytes(1_000_000) is None
    # the file type a searched file is written as: the stock mix nearest under its bits per weight
    assert base_quant(Target("bpw", 4.95), 10**9) == "Q4_K_M"
    assert base_quant(Target("bpw", 2.0), 10**9) == "Q2_K"
    assert base_quant(Target("kld", 0.01), 10**9) == "Q4_K_M"


# -- groups -----------------------------------------------------------------------------------


def dense(layers: int = 6) -> list[search.Tensor]:
    tensors = [search.Tensor("token_embd.weight", (256, 4096)), search.Tensor("output.weight", (256, 4096))]
    for i in range(layers):
        tensors += [search.Tensor(f"blk.{i}.{k}.weight", (256, 256)) for k in ("attn_q", "attn_k", "attn_v", "attn_output")]
        tensors += [search.Tensor(f"blk.{i}.ffn_down.weight", (512, 256)), search.Tensor(f"blk.{i}.ffn_up.weight", (256, 512))]
    return tensors


def test_groups_by_kind_and_layer_band() -> None:
    groups = search.groups_of(dense(6), bands=3)
    names = [g.name for g in groups]
    assert "attn_q@0-1" in names and "attn_q@2-3" in names and "attn_q@4-5" in names
    assert "token_embd" in names and "output" in names
    assert sum(len(g.tensors) for g in groups) == len(dense(6))  # every tensor in exactly one group
    band = next(g for g in groups if g.name == "ffn_down@2-3")
    assert [t.name for t in band.tensors] == ["blk.2.ffn_down.weight", "blk.3.ffn_down.weight"]
    # the rule matches its tensors and no other (llama-quantize searches the lower-cased name)
    rule = parse(f"{band.pattern}=q5_K\n").rules[0]
    assert [t.name for t in dense(6) if rule.matches(t.name)] == [t.name for t in band.tensors]


def test_moe_groups_keep_routed_and_shared_experts_router_and_attention_apart() -> None:
    tensors = [search.Tensor(f"blk.{i}.{k}.weight", shape) for i in range(2) for k, shape in (
        ("ffn_down_exps", (320, 256, 4)), ("ffn_up_exps", (256, 320, 4)), ("ffn_down_shexp", (320, 256)),
        ("ffn_gate_inp", (256, 4)), ("attn_q", (256, 256)))]
    kinds = {g.kind for g in search.groups_of(tensors)}
    assert kinds == {"ffn_down_exps", "ffn_up_exps", "ffn_down_shexp", "ffn_gate_inp", "attn_q"}
    # a 3-D expert tensor is sized as a whole: every expert's rows at the type
    exps = next(g for g in search.groups_of(tensors) if g.kind == "ffn_up_exps")
    assert exps.layers == (0,) and exps.bytes(GGML_TYPES["q8_0"]) == aligned(256 * 320 * 4 // 32 * 34)
    assert not next(g for g in search.groups_of(tensors) if g.kind == "ffn_down_exps").fits(GGML_TYPES["q4_k"])


# -- the allocation -----------------------------------------------------------------------------


def sensitivity(groups: tuple[search.Group, ...], sensitive: str) -> search.Sensitivity:
    """A made-up measurement: one group kind far more sensitive than the rest."""
    types = {"q2_K": 0.30, "q3_K": 0.10, "iq4_xs": 0.04, "q4_K": 0.035, "q5_K": 0.012, "q6_K": 0.006, "q8_0": 0.001}
    delta = {g.name: (0.05 if g.kind == sensitive else 0.002) for g in groups}
    return search.Sensitivity(0.001, types, delta, tokens=8000)


def test_allocation_fits_the_budget_and_protects_the_sensitive_group() -> None:
    groups = search.groups_of(dense(6))
    s = sensitivity(groups, "attn_v")
    all_q4 = sum(g.bytes(GGML_TYPES["q4_k"]) for g in groups)
    alloc = search.allocate(groups, s, budget_bytes=all_q4)
    assert alloc is not None and alloc.bytes <= all_q4
    assert alloc.bytes == search.file_bytes(groups, alloc.types, 0)
    assert all(alloc.types[g.name] in ("q6_K", "q8_0") for g in groups if g.kind == "attn_v")
    # predicted loss no worse than every group at q4_K, for the same bytes
    uniform = s.ref + sum(s.loss(g.name, "q4_K") for g in groups)
    assert alloc.predicted_kld <= uniform
    # deterministic, and a larger budget never predicts more loss
    assert search.allocate(groups, s, budget_bytes=all_q4) == alloc
    bigger = search.allocate(groups, s, budget_bytes=all_q4 * 5 // 4)
    assert bigger is not None and bigger.predicted_kld <= alloc.predicted_kld


def test_allocation_under_a_kld_limit_is_the_smallest_predicted_within_it() -> None:
    groups = search.groups_of(dense(6))
    s = sensitivity(groups, "ffn_down")
    loose = search.allocate(groups, s, max_kld=0.05)
    tight = search.allocate(groups, s, max_kld=0.005)
    assert loose is not None and tight is not None
    assert loose.predicted_kld <= 0.05 and tight.predicted_kld <= 0.005
    assert loose.bytes < tight.bytes
    assert search.allocate(groups, s, max_kld=0.0005) is None  # below what Q8_0 everywhere gives
    smallest = sum(g.bytes(GGML_TYPES["q2_k"]) for g in groups)
    assert search.allocate(groups, s, budget_bytes=smallest - 1) is None


def test_the_recipe_is_a_recipe_file() -> None:
    groups = search.groups_of(dense(6))
    alloc = search.allocate(groups, sensitivity(groups, "attn_v"), budget_bytes=10**7)
    assert alloc is not None
    rec = search.recipe(groups, alloc, ["searched for a test"])
    again = parse(rec.to_text(), "again.recipe")
    assert again.sha256 == rec.sha256 and "# searched for a test" in rec.to_text()
    for g in groups:  # every tensor's rule is its group's type
        for t in g.tensors:
            rule = again.type_of(t.name)
            assert rule is not None and rule.type.name == alloc.types[g.name]


# -- which file ships -----------------------------------------------------------------------------


def measured(kld: float, se: float, size: int, quant: str = "Q4_K_M") -> dict[str, Any]:
    return {"quant": quant, "bytes": size, "bits_per_weight": None,
            "quality": {"kld_mean": kld, "kld_mean_se": se, "tokens": 8000, "ctx": 512, "runtime": "llama.cpp",
                        "weights": None}}


SIZE = Target("size", 1_000_000)


def test_searched_ships_only_when_better_beyond_noise() -> None:
    chosen, why = decide(SIZE, 1_000_000, measured(0.010, 0.0005, 990_000), measured(0.014, 0.0005, 995_000))
    assert chosen == "searched" and "-28.6%" in why and "beyond the noise" in why
    chosen, why = decide(SIZE, 1_000_000, measured(0.0135, 0.0005, 990_000), measured(0.014, 0.0005, 995_000))
    assert chosen == "stock" and "not better" in why
    chosen, why = decide(SIZE, 1_000_000, measured(0.020, 0.0005, 990_000), measured(0.014, 0.0005, 995_000))
    assert chosen == "stock"
    chosen, why = decide(SIZE, 1_000_000, measured(0.010, 0.0005, 990_000), None)
    assert chosen == "searched" and "--no-compare" in why


def test_over_budget_never_ships() -> None:
    chosen, why = decide(SIZE, 1_000_000, measured(0.001, 0.0001, 1_000_001), measured(0.014, 0.0005, 995_000))
    assert chosen == "stock" and "over the budget" in why
    # the stock mix nearest the budget may be a header's bytes over it: compared all the same, never shipped
    chosen, why = decide(SIZE, 1_000_000, measured(0.0138, 0.0005, 990_000), measured(0.014, 0.0005, 1_000_032))
    assert chosen == "searched" and "within the noise" in why and "32 bytes over the budget" in why
    with pytest.raises(ValidationFailedError, match="over the budget"):
        decide(SIZE, 1_000_000, measured(0.001, 0.0001, 1_000_001), measured(0.014, 0.0005, 1_000_002))


def test_a_kld_limit_is_checked_on_the_measured_figure() -> None:
    limit = Target("kld", 0.012)
    # predicted within the limit but measured over it: the stock file within it ships
    chosen, why = decide(limit, None, measured(0.013, 0.0002, 900_000), measured(0.011, 0.0002, 950_000, "Q5_K_S"))
    assert chosen == "stock" and "over the limit" in why
    # both within it: the smaller one
    chosen, _ = decide(limit, None, measured(0.011, 0.0002, 900_000), measured(0.008, 0.0002, 950_000, "Q5_K_S"))
    assert chosen == "searched"
    chosen, _ = decide(limit, None, measured(0.011, 0.0002, 960_000), measured(0.008, 0.0002, 950_000, "Q5_K_S"))
    assert chosen == "stock"


def test_nearest_stock() -> None:
    sizes = {"Q3_K_M": 700, "Q4_K_S": 850, "Q4_K_M": 900, "Q5_K_M": 1100}
    assert nearest_stock(SIZE, sizes, 900, 890) == "Q4_K_M"  # the largest within the budget
    assert nearest_stock(SIZE, sizes, 899, 890) == "Q4_K_S"
    assert nearest_stock(SIZE, sizes, 10, 5) == "Q3_K_M"  # none fits: the smallest
    assert nearest_stock(Target("kld", 0.01), sizes, None, 860) == "Q4_K_M"  # the smallest at least as large


# -- in the result ---------------------------------------------------------------------------------


def budget_doc(chosen: str = "searched") -> dict[str, Any]:
    return {"target": "--target-size 1M", "budget_bytes": 1_000_000, "kld_limit": None, "chosen": chosen,
            "reason": "KLD 0.01 vs 0.014", "predicted_kld": 0.0098,
            "searched": measured(0.010, 0.0005, 990_000, "Q4_K_M"), "stock": measured(0.014, 0.0005, 995_000)}


def test_budget_round_trips_and_says_what_the_search_bought() -> None:
    b = Budget.from_json(budget_doc(), "budget")
    assert Budget.from_json(json.loads(json.dumps(b.to_json())), "budget") == b
    assert b.difference() == "-29% KLD (beyond noise), -5,000 bytes"
    close = Budget.from_json({**budget_doc(), "searched": measured(0.0138, 0.0005, 990_000)}, "budget")
    assert "(within noise)" in close.difference()
    assert Budget.from_json({**budget_doc(), "stock": None}, "budget").difference() == ""
    with pytest.raises(ValueError, match="chosen is 'both'"):
        Budget.from_json({**budget_doc(), "chosen": "both"}, "budget")


def test_budget_rows_show_the_stock_beside_the_searched_file() -> None:
    import dataclasses

    from qwrap.results import RecipeRef

    b = Budget.from_json(budget_doc(), "budget")
    quality = b.searched.quality
    assert quality is not None and isinstance(b.stock, Candidate)
    art = Artifact("gguf", "size-1M", "/o/m-size-1M.gguf", 990_000, None, 7.9, True, quality, None, 1.0, 0, 0,
                   False, None, False, "gguf", "", recipe=RecipeRef("m-size-1M.recipe", "0" * 64, 12), budget=b)
    result = _result((art,))
    (row,) = budget_rows(result)
    assert row[0] == "--target-size 1M" and row[3] == "Q4_K_M" and row[-1] == "searched (12 rules)"
    assert row[2].startswith("0.01 ± 0.0005") and row[5].startswith("0.014 ± 0.0005")
    stock_art = dataclasses.replace(art, budget=dataclasses.replace(b, chosen="stock"))
    assert budget_rows(_result((stock_art,)))[0][-1] == "stock Q4_K_M"
    assert math.isclose(float(row[2].split()[0]), 0.01)


def _result(artifacts: tuple[Artifact, ...]) -> Any:
    from qwrap.results import CalibrationUse, RunResult, Source

    return RunResult("0", Source("m", "m", "/m", None, None, False), "0" * 40, {"output": "/o"}, ("qwrap",), artifacts,
                     None, CalibrationUse("used", "train.txt"), (), ())


def test_artifact_with_a_budget_round_trips() -> None:
    b = Budget.from_json(budget_doc(), "budget")
    quality = Quality.from_json(measured(0.01, 0.0005, 1)["quality"])
    art = Artifact("gguf", "size-1M", "/o/m.gguf", 990_000, None, 7.9, True, quality, "passed", 1.0, 0, 0,
                   False, None, False, "gguf", "", budget=b)
    assert Artifact.from_json(json.loads(json.dumps(art.to_json())), "a") == art
    old = {k: v for k, v in art.to_json().items() if k not in ("budget", "recipe", "fallbacks", "planned_bits_per_weight")}
    assert Artifact.from_json(old, "a").budget is None  # a result written before budgets still loads


def test_push_uploads_the_recipe_beside_its_artifact(tmp_path: Any) -> None:
    import dataclasses

    from qwrap.errors import NotPublishableError
    from qwrap.publish import uploads
    from qwrap.results import RecipeRef

    out = tmp_path
    (out / "m-size-1M.gguf").write_bytes(b"GGUF")
    (out / "README.md").write_text("card")
    b = Budget.from_json(budget_doc(), "budget")
    art = Artifact("gguf", "size-1M", str(out / "m-size-1M.gguf"), 4, None, 7.9, True, b.searched.quality, None, 1.0,
                   0, 0, False, None, False, "gguf", "", recipe=RecipeRef("m-size-1M.recipe", "0" * 64, 12), budget=b)
    result = dataclasses.replace(_result((art,)), request={"output": str(out)})
    with pytest.raises(NotPublishableError, match="its recipe m-size-1M.recipe is missing"):
        uploads(out, result)
    (out / "m-size-1M.recipe").write_text("attn_v=q8_0\n")
    assert [u.path_in_repo for u in uploads(out, result)] == ["m-size-1M.gguf", "m-size-1M.recipe", "README.md"]
