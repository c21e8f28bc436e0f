"""GGUF's actions, one per step kind: the pinned converter and llama.cpp tools as supervised
children of the step, and the weights view as a worker in the validation environment.

The 16-bit intermediate lives in ``.checkpoint/work/``; each quantized file is written as
``<final>.partial`` and renamed by its validate step (into ``.checkpoint/work/`` when a split
step then turns it into ``<final>-00001-of-0000N.gguf`` shards)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from ...context import Inputs, StepContext, StepOutcome
from ...envs import find_env
from ...errors import (
    BackendUnavailableError,
    ModelFilesError,
    StepFailedError,
    ToolchainMissingError,
    ToolKilledError,
    UnsupportedModelError,
    UsageError,
    ValidationFailedError,
)
from ...ggufinfo import GGUFFormatError, GGUFInfo, read_info
from ...journal import sha256_file
from ...model import chat_template
from ...modelfiles import read_header
from ...plan import Step
from ...progress import ChunkProgress, ConvertProgress, QuantizeProgress
from ...quality import base_chunks
from ...supervisor import ProcessResult
from ...toolchain import Toolchain, find_toolchain
from ...worker_client import REFERENCE_DIR, run_worker
from ...workers.backends import VALIDATE_BACKEND
from ...workers.protocol import TextSource, ValidateJob
from .declaration import WORK
from .ggmltypes import ALIGNMENT, BY_ID, GGML_TYPES, aligned
from .perplexity import Argv, offload, write_base
from .perplexity import argv as perplexity_argv
from .perplexity import kld as measure_kld
from .quants import QUANT_TYPES
from .recipes import Recipe
from .rows import projector_usage
from .stats import keep as keep_stats
from .stats import reuse as reuse_stats
from .steps import split_name

VALIDATE_PROMPT = "Once upon a time"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def execute(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    actions = {"gguf.convert": _convert, "gguf.imatrix": _imatrix, "gguf.coverage": _coverage, "gguf.quantize": _quantize,
               "gguf.validate": _validate, "gguf.split": _split, "gguf.eval-base": _eval_base, "gguf.eval": _eval,
               "gguf.weights": _weights, "gguf.mmproj": _mmproj, "gguf.mmproj-validate": _mmproj_validate}
    return actions[step.kind](step, inputs, ctx)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _text_sha256(text: object) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str) else None


def _read_header(path: Path, what: str) -> GGUFInfo:
    try:
        return read_info(path)
    except (OSError, GGUFFormatError) as exc:
        raise ValidationFailedError(f"{what} {path} is not a readable GGUF file: {exc}") from exc


def _convert(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    tools = find_toolchain()
    model = Path(step.file("model"))
    out = ctx.path(step.outputs[0])
    tmp = _partial(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    python = find_env("convert").python
    n_tensors = sum(len(read_header(p).tensors) for p in sorted(model.glob("*.safetensors")))
    argv: list[str | os.PathLike[str]] = [python, tools.converter, model, "--outfile", tmp,
                                          "--outtype", step.param("outtype")]
    result = ctx.run_tool(argv, what="convert_hf_to_gguf.py", parser=ConvertProgress(n_tensors or None),
                          env={"PYTHONUNBUFFERED": "1"}, oom_extra="--no-lazy is off by default; close other jobs")
    info = _read_header(tmp, "the converter's output")
    template, wanted = info.metadata.get(CHAT_TEMPLATE_KEY), chat_template(model)
    if wanted is not None and template != wanted:
        raise ValidationFailedError("the converter's output does not carry the source's chat template "
                                    f"({CHAT_TEMPLATE_KEY} {'differs' if template else 'is missing'})")
    os.replace(tmp, out)
    facts = {"architecture": info.architecture, "tensor_count": len(info.tensors),
             "parameter_count": info.parameter_count, "file_type": info.file_type,
             "chat_template_sha256": _text_sha256(template)}
    return StepOutcome((out,), facts, result.peak_rss_bytes)


def _imatrix(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    tools = find_toolchain()
    out = ctx.path(step.outputs[0])
    tmp = out.with_name("imatrix.partial.gguf")  # llama-imatrix picks its format from the suffix
    tmp.unlink(missing_ok=True)
    if "calib" not in dict(step.files):
        raise UsageError("computing an importance matrix needs calibration text", hint="Pass --calib FILE.txt.")
    if reuse_stats(step, out, ".gguf", "importance matrix", ctx):
        return StepOutcome((out,), {"reused_from_cache": True})
    argv: list[str | os.PathLike[str]] = [
        tools.tool("llama-imatrix"), "-m", inputs["model"].path, "-f", step.file("calib"), "-o", tmp,
        "-t", str(ctx.threads), "-c", "512", "--chunks", str(step.param("chunks")), "--log-jsonl", *offload(tools),
    ]
    result = ctx.run_tool(argv, what="llama-imatrix", parser=ChunkProgress())
    if not tmp.is_file():
        raise ValidationFailedError(f"llama-imatrix exited 0 but wrote no {tmp}")
    os.replace(tmp, out)
    keep_stats(step, out, ".gguf")
    return StepOutcome((out,), {"reused_from_cache": False}, result.peak_rss_bytes)


def _coverage(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    from ...coverage import facts as coverage_facts
    from .coverage import expert_coverage

    layers = expert_coverage(inputs["imatrix"].path)
    minimum = int(step.param("min_expert_tokens"))
    found = coverage_facts(layers, minimum, "importance matrix")
    said, short = found["summary"], found["below"]
    if short and step.param("strict"):
        raise UsageError(f"expert coverage: {said}", hint="More or more varied --calib text routes tokens to every "
                         "expert; or lower --min-expert-tokens, or drop --strict-coverage to warn instead.")
    if short:
        ctx.warning(f"expert coverage: {said}; their importance data is thin (--strict-coverage fails instead)")
    return StepOutcome((), {"expert_coverage": found})


def _quantize(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """llama-quantize one type, with a recipe's per-tensor types when there is one (checked
    first against the 16-bit file and the tool's own dry run); then the fallback audit: the
    tensors whose rows did not take their planned type, and what that cost in size."""
    tools = find_toolchain()
    out = ctx.path(step.outputs[0])
    out.unlink(missing_ok=True)  # llama-quantize can leave a partial file on failure
    quant = step.param("quant")
    model = inputs["model"].path
    argv: list[str | os.PathLike[str]] = [tools.tool("llama-quantize")]
    if "imatrix" in inputs:
        # relative to OUT (the tool runs there): llama-quantize records the path in the artifact,
        # which must not depend on where the output folder is
        argv += ["--imatrix", os.path.relpath(inputs["imatrix"].path, ctx.output)]
    elif "imatrix" in dict(step.files):
        argv += ["--imatrix", step.file("imatrix")]
    recipe = _recipe_of(step, inputs)
    rules = ctx.path(f"{WORK}/{Path(step.outputs[0]).name}.rules")  # what the tool reads: the rules alone
    decided: dict[str, tuple[int, ...]] = {}
    parser = QuantizeProgress()
    try:
        if recipe is not None:
            rules.parent.mkdir(parents=True, exist_ok=True)
            rules.write_text(recipe.rules_text())
            decided = _check_recipe(recipe, step, inputs, ctx, tools, rules)
            argv += ["--tensor-type-file", rules, "--override-kv", f"{RECIPE_SHA256_KEY}=str:{recipe.sha256}"]
            name = _beside_name(step, recipe)
            if len(name) <= MAX_KV_STRING:
                argv += ["--override-kv", f"{RECIPE_FILE_KEY}=str:{name}"]
        argv += [model, out, quant, str(ctx.threads)]
        result = ctx.run_tool(argv, what=f"llama-quantize {quant}", parser=parser, cwd=ctx.output)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        rules.unlink(missing_ok=True)
    info = _read_header(out, f"llama-quantize's {quant} output")
    size = out.stat().st_size
    bpw = size * 8 / info.parameter_count if info.parameter_count else 0.0
    facts: dict[str, Any] = {"bits_per_weight": round(bpw, 3), "bytes": size,
                             **_fallback_audit(info, parser, size, quant, ctx), "recipe": None}
    outputs = [out]
    if recipe is not None:
        _check_applied(recipe, info, decided)
        facts["recipe"] = {"file": _beside_name(step, recipe), "sha256": recipe.sha256, "rules": len(recipe.rules)}
        if len(step.outputs) > 1:  # written beside the artifact, renamed with it by its validate step
            beside = ctx.path(step.outputs[1])
            beside.write_text(recipe.to_text())
            outputs.append(beside)
    return StepOutcome(tuple(outputs), facts, result.peak_rss_bytes)


# The recipe a file was made with, in its metadata (llama.cpp's string overrides hold 127 characters).
RECIPE_SHA256_KEY = "qwrap.recipe.sha256"  # of its rules (Recipe.sha256; comments do not count)
RECIPE_FILE_KEY = "qwrap.recipe.file"  # the recipe file written beside the artifact
MAX_KV_STRING = 127
# A warning when fallbacks made the file larger than planned by more than this.
FALLBACK_WARN_FRACTION = 0.01


def _beside_name(step: Step, recipe: Recipe) -> str:
    if len(step.outputs) > 1:
        return Path(step.outputs[1]).name.removesuffix(".partial")
    return Path(recipe.source).name


def _recipe_of(step: Step, inputs: Inputs) -> Recipe | None:
    """The step's recipe: a searched one (its ``recipe`` input, from gguf.search) or the
    user's --recipe file (``files["recipe"]``), whose rules must still be the planned ones."""
    from .recipes import parse

    if "recipe" in inputs:
        path = inputs["recipe"].path
    elif "recipe" in dict(step.files):
        path = Path(step.file("recipe"))
    else:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the recipe {path}: {exc}") from None
    recipe = parse(text, str(path))
    planned = step.param("recipe_sha256")
    if planned is not None and planned != recipe.sha256:
        raise UsageError(f"the recipe {path} changed since this step was planned",
                         hint="Run the same `qwrap run` again: the plan then takes the new rules.")
    return recipe


def _check_recipe(recipe: Recipe, step: Step, inputs: Inputs, ctx: StepContext, tools: Toolchain,
                  rules: Path) -> dict[str, tuple[int, ...]]:
    """The second line of defence (the first is the model check, before the conversion): the
    recipe against the real 16-bit file, the tensors llama-quantize quantizes being those its
    own dry run changes (and those the pinned rules allow, for a rule that keeps a tensor's
    16-bit type)."""
    from .recipes import check, check_quants, quantizable

    quant = step.param("quant")
    check_quants([quant], recipe.source)
    source = _read_header(inputs["model"].path, "the 16-bit GGUF")
    dry = _Listing()
    ctx.run_tool([tools.tool("llama-quantize"), "--dry-run", "--tensor-type-file", rules, inputs["model"].path,
                  ctx.path(f"{WORK}/dry-run.gguf"), quant, "1"],
                 what=f"llama-quantize --dry-run {quant} (checking the recipe)", parser=dry, cwd=ctx.output)
    if not dry.stored:
        raise ValidationFailedError(f"llama-quantize --dry-run {quant} listed no tensors", hint=f"See {ctx.log_path}.")
    tensors: dict[str, tuple[int, ...]] = {}
    for t in source.tensors:
        rule = recipe.type_of(t.name)
        kept = rule is not None and rule.type.id == t.ggml_type  # a rule that keeps the 16-bit type changes nothing
        if t.name in dry.planned or (kept and quantizable(t.name, t.shape, source.architecture)):
            tensors[t.name] = t.shape
    has_imatrix = "imatrix" in inputs or "imatrix" in dict(step.files)
    check(recipe, tensors, imatrix=has_imatrix)
    return tensors


class _Listing(QuantizeProgress):
    """A dry run's lines, collected without reporting progress (the real run reports it next)."""

    def feed(self, line: str) -> None:
        super().feed(line)


def _check_applied(recipe: Recipe, info: GGUFInfo, tensors: dict[str, tuple[int, ...]]) -> None:
    """Every tensor a rule decides holds the rule's type in the written file."""
    for t in info.tensors:
        rule = recipe.type_of(t.name) if t.name in tensors else None
        if rule is not None and t.ggml_type != rule.type.id:
            got = BY_ID[t.ggml_type].name if t.ggml_type in BY_ID else f"type {t.ggml_type}"
            raise ValidationFailedError(f"{recipe.source} line {rule.line}: {t.name} should be {rule.type.name}; "
                                        f"llama-quantize wrote {got}")


def _fallback_audit(info: GGUFInfo, parser: QuantizeProgress, size: int, quant: str,
                    ctx: StepContext) -> dict[str, Any]:
    """The tensors llama-quantize gave another type than planned (their rows do not take the
    planned type's blocks), and the bits per weight planned (every tensor at the type asked
    for, before fallback) against the file's."""
    fallbacks = parser.fallbacks
    facts: dict[str, Any] = {"fallbacks": [f.to_json() for f in fallbacks],
                             "fallback_count": parser.fallback_count if parser.fallback_count is not None
                             else len(fallbacks),
                             "planned_bytes": None, "planned_bits_per_weight": None}
    shapes = {t.name: (t.shape, BY_ID.get(t.ggml_type)) for t in info.tensors}
    alignment = info.metadata.get("general.alignment")
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else ALIGNMENT
    planned = float(size)
    for f in fallbacks:
        shape, got = shapes.get(f.tensor, ((), None))
        wanted = GGML_TYPES.get(f.wanted.lower())
        if got is None or wanted is None:  # a type this table does not know: no planned figure
            return facts
        planned += wanted.exact_bytes(shape) - aligned(got.tensor_bytes(shape), alignment)
    params = info.parameter_count
    if not params:
        return facts
    facts["planned_bytes"] = round(planned)
    facts["planned_bits_per_weight"] = round(planned * 8 / params, 3)
    if fallbacks and size > planned * (1 + FALLBACK_WARN_FRACTION):
        shown = ", ".join(f"{f.tensor} {f.wanted}->{f.got}" for f in fallbacks[:3])
        more = f" and {len(fallbacks) - 3} more" if len(fallbacks) > 3 else ""
        ctx.warning(f"{quant}: {len(fallbacks)} tensor(s) fell back to larger types ({shown}{more}: their rows do "
                    f"not take the planned type's blocks); the file is {size / planned - 1:.1%} larger than planned "
                    f"({size * 8 / params:.2f} bits per weight instead of {planned * 8 / params:.2f})")
    return facts


def _load_and_generate(model: Path, what: str, ctx: StepContext) -> ProcessResult:
    """The real load: llama.cpp reads ``model`` (a split set from its first shard) and generates."""
    tools = find_toolchain()
    argv: list[str | os.PathLike[str]] = [tools.tool("llama-simple"), "-m", model, "-n", "8", *offload(tools),
                                          VALIDATE_PROMPT]
    try:
        result = ctx.run_tool(argv, what=f"loading {what} in llama.cpp")
    except ToolKilledError:
        raise
    except (StepFailedError, ModelFilesError) as exc:  # the artifact is what failed, not a tool
        raise ValidationFailedError(f"llama.cpp cannot load {what}: {exc.message}",
                                    hint=exc.hint, log_path=exc.log_path) from None
    if VALIDATE_PROMPT not in "\n".join(result.tail):
        raise ValidationFailedError(f"llama.cpp loaded {what} but generated nothing")
    return result


def _validate(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """Read the header back, compare with the 16-bit source, load it in llama.cpp and
    generate a few tokens; only then rename the partial file to its final name."""
    quant = step.param("quant")
    partial = inputs["artifact"].path
    final = ctx.path(step.outputs[0])
    source = inputs["source"].facts
    info = _read_header(partial, f"the {quant} artifact")
    # a budget's file is a searched recipe or the stock type that beat it (gguf.choose says which)
    expected = QUANT_TYPES[inputs["artifact"].facts.get("quant") or quant].ftype
    problems = []
    if source.get("architecture") and info.architecture != source["architecture"]:
        problems.append(f"architecture {info.architecture!r} != source {source['architecture']!r}")
    if info.file_type != expected:
        problems.append(f"file type {info.file_type} != {expected} ({quant})")
    if source.get("tensor_count") and len(info.tensors) != source["tensor_count"]:
        problems.append(f"{len(info.tensors)} tensors != {source['tensor_count']} in the 16-bit source")
    if "chat_template_sha256" in source and _text_sha256(info.metadata.get(CHAT_TEMPLATE_KEY)) != \
            source["chat_template_sha256"]:
        problems.append(f"{CHAT_TEMPLATE_KEY} differs from the source's chat template")
    if problems:
        raise ValidationFailedError(f"{quant} artifact failed header checks: " + "; ".join(problems))
    result = _load_and_generate(partial, f"the {quant} artifact", ctx)
    ctx.check_final(final)
    renames = [(partial, final)]
    written = inputs["artifact"].paths[1:]
    if written and len(step.outputs) > 1:  # the recipe written beside the artifact
        beside = ctx.path(step.outputs[1])
        if not written[0].is_file():
            raise ValidationFailedError(f"the recipe {written[0]} written with the {quant} artifact is missing")
        ctx.check_final(beside)
        renames.append((written[0], beside))
    facts = {"validated": True, "architecture": info.architecture, "tensor_count": len(info.tensors)}
    return StepOutcome((), facts, result.peak_rss_bytes, renames=tuple(renames))


def _split(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """llama-gguf-split the validated file into shards, load the set from its first shard in
    llama.cpp, and rename the shards to their final names only then."""
    quant, single = step.param("quant"), inputs["artifact"].path
    stage = ctx.path(f"{WORK}/split-{quant}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    prefix = stage / single.name.removesuffix(".gguf")
    ctx.run_tool([find_toolchain().tool("llama-gguf-split"), "--split", "--split-max-size", step.param("max_size"),
                  single, prefix], what=f"llama-gguf-split of {quant}")
    shards = sorted(stage.glob(f"{prefix.name}-*-of-*.gguf"))
    if not shards or [s.name for s in shards] != [split_name(single.name, i + 1, len(shards)) for i in range(len(shards))]:
        raise ValidationFailedError(f"llama-gguf-split wrote {[s.name for s in shards]}, not a numbered set of shards")
    result = _load_and_generate(shards[0], f"the first of {len(shards)} {quant} shards", ctx)
    finals = [ctx.path(s.name) for s in shards]
    for final in finals:
        ctx.check_final(final)
    listed = [{"path": f.name, "bytes": s.stat().st_size, "sha256": sha256_file(s)} for s, f in zip(shards, finals, strict=True)]
    facts = {"validated": True, "shards": listed}
    return StepOutcome((), facts, result.peak_rss_bytes, renames=tuple(zip(shards, finals, strict=True)))


def _perplexity_argv(model: Path, step: Step, ctx: StepContext) -> Argv:
    return perplexity_argv(find_toolchain(), model, step.param("ctx"), step.param("chunks"), ctx.threads)


def _eval_base(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    if "text" not in dict(step.files):
        raise UsageError("measuring quality needs evaluation text", hint="Pass --eval-text FILE, or --no-eval.")
    out = ctx.path(step.outputs[0])
    tmp = _partial(out)
    tmp.unlink(missing_ok=True)
    short = UsageError(f"the evaluation text {step.file('text')} is too short for two chunks of {step.param('ctx')} "
                       "tokens", hint="Pass a longer --eval-text, a smaller --eval-ctx, or --no-eval.")
    ppl, result = write_base(ctx, _perplexity_argv(inputs["model"].path, step, ctx), step.file("text"),
                                        tmp, "llama-perplexity (16-bit reference)", short, parser=ChunkProgress())
    os.replace(tmp, out)
    chunks = base_chunks(out)  # the text may hold fewer chunks than asked for: llama-perplexity takes them all
    return StepOutcome((out,), {"ppl_base": ppl, "ctx": step.param("ctx"), "chunks": chunks}, result.peak_rss_bytes)


def _eval(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    quant = step.param("quant")
    figures, result = measure_kld(ctx, _perplexity_argv(inputs["artifact"].path, step, ctx), inputs["base"].path,
                                     f"llama-perplexity {quant}")
    chunks = int(inputs["base"].facts.get("chunks") or step.param("chunks"))
    scored = chunks * (step.param("ctx") - 1 - step.param("ctx") // 2)
    quality = {**figures, "tokens": scored, "ctx": step.param("ctx"), "runtime": "llama.cpp", "weights": None}
    return StepOutcome((), {"quality": quality}, result.peak_rss_bytes)


def _weights(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """The weights view: the artifact dequantized (transformers' GGUF loader) into the source's
    model class, scored in transformers on the same token ids as every other row. A type or
    architecture that loader cannot read is reported as such, not as a failure of the run."""
    quant = step.param("quant")
    tokens = str(inputs["tokens"].path)
    job = ValidateJob(model=step.file("model"), quantized=str(inputs["artifact"].path),
                      text=TextSource(path=tokens), device="auto", eval_source=tokens,
                      eval_source_kind="llama-kld", eval_ctx=step.param("ctx"), eval_chunks=step.param("chunks"),
                      reference_cache=str(ctx.path(REFERENCE_DIR) / "reference.safetensors"))
    try:
        events, peak = run_worker(ctx, job, VALIDATE_BACKEND, f"measuring {quant}'s weights in transformers")
    except (UnsupportedModelError, ToolchainMissingError, BackendUnavailableError) as exc:
        ctx.warning(f"{quant}'s weights not measured in transformers: {exc.message}")
        return StepOutcome((), {"weights": {"unavailable": exc.message}})
    assert events.result is not None
    return StepOutcome((), {"weights": events.result.get("metadata", {}).get("eval")}, peak)


# -- a vision model's projector ---------------------------------------------------------------

MMPROJ_TYPE_KEY = "general.type"  # "mmproj" in a projector file
PROJECTOR_TYPE_KEY = "clip.projector_type"
MMPROJ_FTYPES = {"f16": 1, "q8_0": 7}  # llama.cpp's file types (LLAMA_FTYPE_MOSTLY_*)
VALIDATE_IMAGE = "mmproj-check.ppm"  # written beside the step's log, removed after
MTMD_PROMPT = "Describe the image."


def _mmproj(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """The pinned converter's ``--mmproj``: the vision tower and its projector alone, in the
    asked type, written as ``<final>.partial`` (renamed by the validation)."""
    tools = find_toolchain()
    out = ctx.path(step.outputs[0])
    out.unlink(missing_ok=True)
    kind = step.param("mmproj_type")
    argv: list[str | os.PathLike[str]] = [find_env("convert").python, tools.converter, Path(step.file("model")),
                                          "--mmproj", "--outfile", out, "--outtype", kind]
    try:
        result = ctx.run_tool(argv, what="convert_hf_to_gguf.py --mmproj", parser=ConvertProgress(None),
                              env={"PYTHONUNBUFFERED": "1"})
        info = _read_header(out, "the converter's projector")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if info.metadata.get(MMPROJ_TYPE_KEY) != "mmproj":
        raise ValidationFailedError(f"the converter's --mmproj output is not a projector file "
                                    f"({MMPROJ_TYPE_KEY} is {info.metadata.get(MMPROJ_TYPE_KEY)!r})")
    if info.file_type != MMPROJ_FTYPES[kind]:
        raise ValidationFailedError(f"the projector's file type is {info.file_type}, not {kind.upper()}'s "
                                    f"{MMPROJ_FTYPES[kind]}")
    projector = info.metadata.get(PROJECTOR_TYPE_KEY)
    facts = {"architecture": info.architecture, "tensor_count": len(info.tensors), "file_type": info.file_type,
             "projector_type": projector if isinstance(projector, str) else None, "bytes": out.stat().st_size}
    return StepOutcome((out,), facts, result.peak_rss_bytes)


def write_image(path: Path, width: int = 64, height: int = 48) -> None:
    """A small colour gradient as a binary PPM (P6), which llama.cpp's image reader (stb_image) reads."""
    pixels = bytearray()
    for y in range(height):
        for x in range(width):
            pixels += bytes((x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)))
    path.write_bytes(b"P6\n%d %d\n255\n" % (width, height) + bytes(pixels))


class _MtmdLines:
    """llama-mtmd-cli's lines: whether the projector encoded the image (the tool exits 1 when
    the text model cannot decode its embeddings or generate)."""

    def __init__(self) -> None:
        self.encoded = False

    def feed(self, line: str) -> None:
        self.encoded = self.encoded or "mtmd batch encoding done in" in line or "slice encoded in" in line


def _mmproj_validate(step: Step, inputs: Inputs, ctx: StepContext) -> StepOutcome:
    """The real load: llama-mtmd-cli reads a validated text file and the projector, encodes a
    small image with the vision tower, feeds it to the text model and generates a few tokens;
    only then the projector is renamed to its final name."""
    tools = find_toolchain()
    partial, text = inputs["projector"].path, inputs["model"].path
    final = ctx.path(step.outputs[0])
    image = ctx.log_path.with_name(VALIDATE_IMAGE)
    image.parent.mkdir(parents=True, exist_ok=True)
    write_image(image)
    lines = _MtmdLines()
    argv: list[str | os.PathLike[str]] = [
        tools.tool("llama-mtmd-cli"), "-m", text, "--mmproj", partial, "--image", image, "-p", MTMD_PROMPT,
        "-n", "8", "-c", "2048", "--temp", "0", "--seed", "0", "-t", str(ctx.threads),
        # no warm-up: it encodes an image of the largest size the projector takes, which on a CPU
        # costs more than the whole check; the small image is scaled up to the smallest it takes
        "--no-warmup", *offload(tools)]
    what = f"{partial.name.removesuffix('.partial')} with {text.name}"
    try:
        result = ctx.run_tool(argv, what=f"loading {what} in llama-mtmd-cli", parser=lines)
    except ToolKilledError:
        raise
    except (StepFailedError, ModelFilesError) as exc:  # the projector is what failed, not a tool
        raise ValidationFailedError(f"llama-mtmd-cli cannot load {what}: {exc.message}",
                                    hint=exc.hint, log_path=exc.log_path) from None
    finally:
        image.unlink(missing_ok=True)
    if not lines.encoded:
        raise ValidationFailedError(f"llama-mtmd-cli loaded {what} but did not encode the image",
                                    hint=f"See {result.log_path}.")
    ctx.check_final(final)
    made = inputs["projector"].facts
    facts = {"validated": True, "projector": {
        "file": final.name, "type": str(step.param("mmproj_type")).upper(), "projector_type": made.get("projector_type"),
        "validated_with": text.name, "usage": projector_usage(text.name, final.name)}}
    return StepOutcome((), facts, result.peak_rss_bytes, renames=((partial, final),))

