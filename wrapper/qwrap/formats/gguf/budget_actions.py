"""The actions of a budgeted GGUF (``--target-size``, ``--target-bpw``, ``--target-kld``):

- ``gguf.sensitivity`` (once a run): KLD probes on calibration text (search.py says which);
  a calibration statistic, kept in the cache by the step's fingerprint (the model, the
  calibration text, the pinned tools), so other budgets, reruns and other output folders
  reuse it;
- ``gguf.search:<budget>``: the allocation within the budget, written as a recipe file, and
  the exact sizes of the stock types (``llama-quantize --dry-run``) to pick the one to compare;
- ``gguf.compare:<budget>``: the stock type nearest the budget, quantized and measured on the
  same tokens as every other row;
- ``gguf.choose:<budget>``: the searched file ships if it is better than the stock one beyond
  the measurement's noise (and within its budget), else the stock file ships, and it says so.

The searched file itself is quantized by ``gguf.quantize`` (with the search's recipe) and
measured by ``gguf.eval``, as any other type."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ...context import Inputs, StepContext, StepOutcome
from ...errors import UsageError, ValidationFailedError
from ...ggufinfo import GGUFInfo, read_info
from ...plan import Step
from ...quality import (
    NOISE_SIGMAS,
    Quality,
    base_chunks,
    combined_se,
    within_noise,
)
from ...toolchain import Toolchain, find_toolchain
from .budgets import Target, human_size
from .ggmltypes import BY_ID, GGML_TYPES, aligned
from .perplexity import argv as perplexity_argv
from .perplexity import kld as measure_kld
from .perplexity import write_base
from .recipes import Recipe, parse, recipe_name
from .search import (
    CANDIDATES,
    REFERENCE,
    SIZE_MARGIN_BYTES,
    Group,
    Sensitivity,
    Tensor,
    allocate,
    groups_of,
    probe_type,
)
from .search import file_bytes as searched_bytes
from .search import recipe as searched_recipe
from .stats import keep as keep_stats
from .stats import reuse as reuse_stats

# The stock mixes a budget is compared with (the nearest one at or under its size).
STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
_DRY = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[([\d,\s]+)\],\s+type\s*=\s*(\w+),\s+size\s*=\s*[\d.]+\s+MiB"
                  r"(?:\s*->\s*[\d.]+\s+MiB\s+\((\w+)\))?")


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    actions = {"gguf.sensitivity": _sensitivity, "gguf.search": _search, "gguf.compare": _compare,
               "gguf.choose": _choose}
    return actions[step.kind](step, inputs, ctx)


class _Lines:
    """Keeps every line of a child's output (a dry run prints one line per tensor)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def feed(self, line: str) -> None:
        self.lines.append(line)


def dry_run(tools: Toolchain, model: Path, ftype: str, ctx: StepContext, *, imatrix: Path | None = None,
            rules: Path | None = None, pure: bool = False) -> dict[str, str]:
    """What llama-quantize would make of every tensor (after its fallbacks), without writing:
    tensor name -> ggml type name; tensors it leaves alone keep their stored type."""
    argv: list[str | os.PathLike[str]] = [tools.tool("llama-quantize"), "--dry-run"]
    if pure:
        argv.append("--pure")
    if imatrix is not None:
        argv += ["--imatrix", imatrix]
    if rules is not None:
        argv += ["--tensor-type-file", rules]
    lines = _Lines()
    ctx.run_tool([*argv, model, ctx.path(".checkpoint/work/dry-run.gguf"), ftype, "1"],
                 what=f"llama-quantize --dry-run {ftype}", parser=lines)
    found: dict[str, str] = {}
    for line in lines.lines:
        m = _DRY.search(line.strip())
        if m:
            found[m[1]] = m[4] or m[3]
    if not found:
        raise ValidationFailedError(f"llama-quantize --dry-run {ftype} listed no tensors", hint=f"See {ctx.log_path}.")
    return found


def quantized_tensors(tools: Toolchain, model: Path, info: GGUFInfo, ctx: StepContext) -> tuple[Tensor, ...]:
    """The tensors llama-quantize quantizes (1-D norms and what llama.cpp keeps in float stay out)."""
    stored = {t.name: BY_ID.get(t.ggml_type) for t in info.tensors}
    planned = dry_run(tools, model, "Q8_0", ctx, pure=True)
    return tuple(Tensor(t.name, tuple(t.shape)) for t in info.tensors
                 if planned.get(t.name, "").lower() == "q8_0" and stored.get(t.name) != GGML_TYPES["q8_0"])


def file_bytes(info: GGUFInfo, types: dict[str, str], added_header: int = 0) -> int:
    """A file's exact size when its tensors take ``types`` (name -> ggml type name): the
    16-bit file's header with ``added_header`` bytes of metadata more, aligned, then each
    tensor's data aligned to 32 bytes."""
    total = aligned(info.header_bytes + added_header) if info.header_bytes else info.data_offset
    for t in info.tensors:
        gt = GGML_TYPES.get(types.get(t.name, "").lower()) or BY_ID[t.ggml_type]
        total += aligned(gt.tensor_bytes(t.shape))
    return total


def _kv_bytes(key: str, value: str | int) -> int:
    """One GGUF metadata entry: key (u64 length + bytes), type (u32), value (a string: u64
    length + bytes; here an int32)."""
    return 8 + len(key.encode()) + 4 + (8 + len(value.encode()) if isinstance(value, str) else 4)


def imatrix_metadata_bytes(imatrix: Path, as_passed: str) -> int:
    """The metadata llama-quantize adds to a file quantized with an importance matrix (passed to
    it as ``as_passed``): its file name, its first dataset, its entry and chunk counts."""
    info = read_info(imatrix, keep_arrays=True).metadata
    datasets = info.get("imatrix.datasets") or []
    added = _kv_bytes("quantize.imatrix.file", as_passed) + _kv_bytes("quantize.imatrix.entries_count", 0)
    if datasets:
        added += _kv_bytes("quantize.imatrix.dataset", str(datasets[0]))
    if info.get("imatrix.chunk_count"):
        added += _kv_bytes("quantize.imatrix.chunks_count", 0)
    return added


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _sensitivity(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    out = ctx.path(step.outputs[0])
    if reuse_stats(step, out, ".json", "sensitivity", ctx):
        return StepOutcome((out,), {"reused_from_cache": True, **_summary(json.loads(out.read_text()))})
    tools = find_toolchain()
    model, imatrix = inputs["model"].path, inputs["imatrix"].path
    info = read_info(model)
    tensors = quantized_tensors(tools, model, info, ctx)
    groups = groups_of(tensors, int(step.param("bands")))
    work = ctx.path(f".checkpoint/work/sensitivity-{step.fingerprint[:12]}")
    work.mkdir(parents=True, exist_ok=True)
    ctx_len, chunks = int(step.param("ctx")), int(step.param("chunks"))
    base = work / "calibration.kld"
    if not base.is_file():
        tmp = work / "calibration.kld.partial"
        short = UsageError(f"the calibration text is too short for two chunks of {ctx_len} tokens to measure "
                           "sensitivity on", hint="Pass a longer --calib.")
        write_base(ctx, perplexity_argv(tools, model, ctx_len, chunks, ctx.threads), step.file("calib"), tmp,
                              "llama-perplexity (16-bit, calibration text)", short)
        os.replace(tmp, base)
    probes: list[tuple[str, list[str]]] = [("ref", [])]
    for t in CANDIDATES:
        if t != REFERENCE:
            probes.append((f"type:{t}", [f"{g.pattern}={t}" for g in groups if g.fits(GGML_TYPES[t.lower()])]))
    probes += [(f"group:{g.name}", [f"{g.pattern}={probe_type(g).name}"]) for g in groups]
    done_path = work / "probes.json"  # a killed step resumes at the next probe
    done: dict[str, float] = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for i, (probe, rules) in enumerate(probes):
        ctx.progress(i, len(probes), "probes")
        if probe in done:
            continue
        rules_file = work / "probe.rules"
        rules_file.write_text("".join(r + "\n" for r in rules))
        probe_model = work / "probe.gguf"
        probe_model.unlink(missing_ok=True)
        argv: list[str | os.PathLike[str]] = [tools.tool("llama-quantize"), "--pure", "--imatrix", imatrix]
        if rules:
            argv += ["--tensor-type-file", rules_file]
        ctx.run_tool([*argv, model, probe_model, "Q8_0", str(ctx.threads)], what=f"llama-quantize (probe {probe})")
        figures, _ = measure_kld(ctx, perplexity_argv(tools, probe_model, ctx_len, chunks, ctx.threads), base,
                                    f"llama-perplexity (probe {probe})")
        done[probe] = figures["kld_mean"]
        probe_model.unlink(missing_ok=True)
        _write_json(done_path, done)
    ctx.progress(len(probes), len(probes), "probes")
    ref = done["ref"]
    measured = base_chunks(base)  # a short calibration text holds fewer than asked for: all are measured
    sens = Sensitivity(ref, {t: done[f"type:{t}"] for t in CANDIDATES if f"type:{t}" in done},
                       {g.name: done[f"group:{g.name}"] - ref for g in groups},
                       measured * (ctx_len - 1 - ctx_len // 2))
    data = {"sensitivity": sens.to_json(), "bands": int(step.param("bands")), "ctx": ctx_len, "chunks": measured,
            "groups": [{"name": g.name, "kind": g.kind, "layers": list(g.layers),
                        "tensors": [[t.name, list(t.shape)] for t in g.tensors]} for g in groups],
            "probes": len(probes)}
    _write_json(out, data)
    keep_stats(step, out, ".json")
    shutil.rmtree(work, ignore_errors=True)
    return StepOutcome((out,), {"reused_from_cache": False, **_summary(data)})


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    return {"groups": len(data["groups"]), "probes": data["probes"], "tokens": data["sensitivity"]["tokens"]}


def _load(path: Path) -> tuple[tuple[Group, ...], Sensitivity]:
    data = json.loads(path.read_text())
    groups = tuple(Group(g["name"], g["kind"], tuple(g["layers"]),
                                tuple(Tensor(n, tuple(s)) for n, s in g["tensors"])) for g in data["groups"])
    return groups, Sensitivity.from_json(data["sensitivity"])


def stock_sizes(tools: Toolchain, model: Path, imatrix: Path, info: GGUFInfo, ctx: StepContext) -> dict[str, int]:
    """Each stock type's exact file size, as gguf.compare (and a -q run) makes it: its dry run's
    tensor types, and the importance matrix's metadata in its header."""
    added = imatrix_metadata_bytes(imatrix, _relative(imatrix, ctx))
    return {q: file_bytes(info, dry_run(tools, model, q, ctx, imatrix=imatrix), added) for q in STOCK}


def _relative(path: Path, ctx: StepContext) -> str:
    """A path as llama-quantize is given it (it runs in OUT and records the importance matrix's
    path in the file, which must not depend on where the output folder is)."""
    return os.path.relpath(path, ctx.output)


def nearest_stock(target: Target, sizes: dict[str, int], budget: int | None, searched: int) -> str:
    """The stock type to compare with: the largest one within the budget (a size budget), or the
    smallest one at least as large as the searched file (a KLD budget); else the nearest."""
    ordered = sorted(sizes, key=lambda q: (sizes[q], q))
    if budget is not None:
        fitting = [q for q in ordered if sizes[q] <= budget]
        return fitting[-1] if fitting else ordered[0]
    larger = [q for q in ordered if sizes[q] >= searched]
    return larger[0] if larger else ordered[-1]


def _search(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    tools = find_toolchain()
    target = Target.from_key(step.param("target"))
    model, imatrix = inputs["model"].path, inputs["imatrix"].path
    info = read_info(model)
    groups, sens = _load(inputs["sensitivity"].path)
    in_groups = {t.name for g in groups for t in g.tensors}
    fixed = file_bytes(info, {}) - sum(aligned(BY_ID[t.ggml_type].tensor_bytes(t.shape))
                                       for t in info.tensors if t.name in in_groups)
    budget = target.budget_bytes(info.parameter_count)
    if budget is not None:
        alloc = allocate(groups, sens, budget_bytes=budget - fixed - SIZE_MARGIN_BYTES)
        if alloc is None:
            smallest = searched_bytes(groups, {g.name: CANDIDATES[0] for g in groups}, fixed)
            raise UsageError(f"{target.shown}: no recipe fits in {human_size(budget)} bytes; the smallest this search "
                             f"makes is {human_size(smallest)}", hint="Raise the budget (or ask for a stock type with -q).")
    else:
        alloc = allocate(groups, sens, max_kld=target.value)
        if alloc is None:
            raise UsageError(f"{target.shown}: no recipe of the candidate types is predicted to stay under "
                             f"KLD {target.value:g} (Q8_0 everywhere is predicted at {sens.ref:.4g})",
                             hint="Raise the KLD limit, or ask for a 16-bit file (-q F16).")
    predicted = searched_bytes(groups, alloc.types, fixed)
    sizes = stock_sizes(tools, model, imatrix, info, ctx)
    stock = nearest_stock(target, sizes, budget, predicted)
    comments = (f"qwrap recipe search for {target.shown}: {len(groups)} tensor groups, sensitivity measured as KLD on "
                f"{sens.tokens} calibration tokens.",
                f"Predicted: {predicted} bytes, KLD {alloc.predicted_kld:.4g} (a prediction; the result has the "
                "measured figures).",
                f"Use again with: qwrap run MODEL -f gguf -q {step.param('quant')} --recipe THIS_FILE")
    rec = searched_recipe(groups, alloc, comments)
    out = ctx.path(step.outputs[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(rec.to_text())
    os.replace(tmp, out)
    facts = {"target": target.key, "budget_bytes": budget, "predicted_bytes": predicted,
             "predicted_kld": alloc.predicted_kld, "stock": stock, "stock_bytes": sizes[stock],
             "stock_sizes": sizes, "recipe": {"file": out.name, "sha256": rec.sha256, "rules": len(rec.rules)},
             "types": dict(alloc.types)}
    return StepOutcome((out,), facts)


def _compare(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """Quantize the stock type the search picked (with the same importance matrix) and measure
    it against the same reference as every other row."""
    tools = find_toolchain()
    quant = str(inputs["search"].facts["stock"])
    out = ctx.path(step.outputs[0])
    out.unlink(missing_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.unlink(missing_ok=True)
    ctx.run_tool([tools.tool("llama-quantize"), "--imatrix", _relative(inputs["imatrix"].path, ctx), inputs["model"].path,
                  tmp, quant, str(ctx.threads)], what=f"llama-quantize {quant} (stock, to compare)", cwd=ctx.output)
    os.replace(tmp, out)
    base = inputs["base"]
    ctx_len = int(step.param("ctx"))
    chunks = int(base.facts.get("chunks") or step.param("chunks"))
    figures, _ = measure_kld(ctx, perplexity_argv(tools, out, ctx_len, chunks, ctx.threads), base.path,
                                f"llama-perplexity {quant} (stock)")
    size = out.stat().st_size
    info = read_info(out)
    quality = {**figures, "tokens": chunks * (ctx_len - 1 - ctx_len // 2), "ctx": ctx_len, "runtime": "llama.cpp",
               "weights": None}
    return StepOutcome((out,), {"quant": quant, "bytes": size, "quality": quality,
                                "bits_per_weight": round(size * 8 / info.parameter_count, 3)})


def decide(target: Target, budget: int | None, searched: dict[str, Any], stock: dict[str, Any] | None) -> tuple[str, str]:
    """Which file ships under a budget ("searched" or "stock") and why, from the measured
    figures: the searched file must fit its budget and beat the stock one beyond the noise of
    the two measurements (``quality.within_noise``: two combined standard errors)."""
    kld = searched["quality"]["kld_mean"]
    if budget is not None and searched["bytes"] > budget:
        if stock is not None and stock["bytes"] <= budget:
            return "stock", f"the searched file ({searched['bytes']} bytes) is over the budget ({budget})"
        raise ValidationFailedError(f"{target.shown}: the searched file is {searched['bytes']} bytes, over the "
                                    f"budget of {budget}", hint="Raise the budget a little; this is a bug worth reporting.")
    if stock is None:
        return "searched", "not compared (--no-compare)"
    skld = stock["quality"]["kld_mean"]
    mine, theirs = Quality.from_json(searched["quality"]), Quality.from_json(stock["quality"])
    se = combined_se(mine, theirs)
    noise = f"±{NOISE_SIGMAS * se:.2g}" if se is not None else "unknown (no standard errors)"
    change = f"{(kld - skld) / skld:+.1%}" if skld else f"{kld - skld:+.3g}"
    better = kld < skld and se is not None and not within_noise(mine, theirs)
    compared = (f"KLD {kld:.4g} vs {skld:.4g} for the stock {stock['quant']} ({change}, "
                f"{'beyond' if better else 'within'} the noise of {noise})")
    if budget is not None and stock["bytes"] > budget:  # the nearest stock mix is (a header's bytes) over it
        return "searched", f"{compared}; the stock file is {stock['bytes'] - budget} bytes over the budget"
    if target.kind == "kld" and skld > target.value:
        return "searched", f"{compared}; the stock file is over the KLD limit"
    if target.kind == "kld" and kld > target.value:
        return "stock", f"the searched file measured KLD {kld:.4g}, over the limit; the stock {stock['quant']} is within it"
    if target.kind == "kld" and stock["bytes"] < searched["bytes"]:
        return "stock", f"the stock {stock['quant']} is smaller and within the limit"
    if better:
        return "searched", compared
    if target.kind == "kld" and stock["bytes"] > searched["bytes"]:  # no worse and smaller: the point of the limit
        return "searched", (f"within the limit and {stock['bytes'] - searched['bytes']} bytes smaller than the stock "
                            f"{stock['quant']} (KLD {kld:.4g} vs {skld:.4g})")
    return "stock", (f"the searched file (KLD {kld:.4g}) is not better than the stock {stock['quant']} ({skld:.4g}) "
                     f"beyond the noise of {noise}")


def _stock_recipe(target: Target, quant: str, why: str) -> str:
    """The recipe written beside a budget's file when the stock mix ships: no rules (the stock
    mix), and why."""
    return (f"# qwrap: for {target.shown} the stock {quant} shipped, not the searched recipe: {why}.\n"
            f"# No per-tensor rules: the stock mix. Made again with: qwrap run MODEL -f gguf -q {quant}\n")


def _choose(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    target = Target.from_key(step.param("target"))
    found = inputs["search"].facts
    budget = found.get("budget_bytes")
    searched_path = inputs["searched"].path
    made = inputs["searched"].facts
    searched = {"quant": step.param("quant"), "bytes": searched_path.stat().st_size,
                "quality": inputs["measured"].facts["quality"], "bits_per_weight": made.get("bits_per_weight")}
    stock = dict(inputs["stock"].facts) if "stock" in inputs else None
    chosen, why = decide(target, budget, searched, stock)
    winner = searched if chosen == "searched" else stock
    assert winner is not None
    source = searched_path if chosen == "searched" else inputs["stock"].path
    out = ctx.path(step.outputs[0])
    out.unlink(missing_ok=True)
    try:
        os.link(source, out)
    except OSError:
        shutil.copyfile(source, out)
    # the recipe beside the file: the searched one, or an empty one naming the stock type
    text = inputs["search"].path.read_text() if chosen == "searched" else _stock_recipe(target, winner["quant"], why)
    name = recipe_name(Path(step.outputs[0]).name).removesuffix(".partial")
    written = parse(text, name) if chosen == "searched" else Recipe((), name, text=text)
    facts: dict[str, Any] = {
        "target": target.key, "chosen": chosen, "reason": why, "quant": winner["quant"], "bytes": winner["bytes"],
        "bits_per_weight": winner.get("bits_per_weight"), "quality": winner["quality"], "searched": searched,
        "stock": stock, "budget_bytes": budget, "predicted_kld": found.get("predicted_kld"),
        "predicted_bytes": found.get("predicted_bytes"),
        "fallbacks": list(made.get("fallbacks") or ()) if chosen == "searched" else [],
        "planned_bits_per_weight": made.get("planned_bits_per_weight") if chosen == "searched" else None,
        "recipe": {"file": name, "sha256": written.sha256,
                   "rules": len(written.rules)}}
    outputs = [out]
    if len(step.outputs) > 1:
        beside = ctx.path(step.outputs[1])
        beside.write_text(text)
        outputs.append(beside)
    if chosen == "stock":
        ctx.warning(f"{target.shown}: shipping the stock {winner['quant']}: {why}")
    return StepOutcome(tuple(outputs), facts)
