"""GGUF's model checks before heavy work: the pinned converter knows the architecture, (for
`plan`) a vocab-only conversion, seconds without weights, accepts the tokenizer, and (for `plan`
and `run` alike) a --recipe fits this model's GGUF tensors, listed by the converter's dry run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from ...checks import Check
from ...children import run_checked
from ...envs import find_env
from ...errors import QwrapError, ToolchainMissingError, UnsupportedModelError, ValidationFailedError
from ...evaltext import kld_standard_error
from ...model import ModelInfo
from ...quality import NOISE_SIGMAS
from ...toolchain import cache_root, find_toolchain, mmproj_architectures, supported_architectures
from .budgets import Target
from .declaration import NO_IMATRIX, Options
from .quants import IMATRIX_BY_DEFAULT, IMATRIX_IGNORED, QUANT_TYPES, normalize_quant

# convert_hf_to_gguf.py: "INFO:hf-to-gguf:blk.0.ffn_down.weight,   torch.bfloat16 --> F16, shape = {320, 256}"
# (the shape in GGUF order: the row length first)
_LISTED = re.compile(r"^INFO:hf-to-gguf:(\S+?),\s+\S+\s+-->\s+\w+,\s+shape\s*=\s*\{([\d,\s]*)\}")
LISTING_VERSION = 1  # bump when what is cached changes
LISTINGS_KEPT = 200


def checks(o: Options, model: ModelInfo, *, thorough: bool) -> list[Check]:
    found = [_architecture_check(model)]
    if thorough and found[0].ok:
        found.append(_tokenizer_check(model))
    if o.recipe is not None and found[0].ok:  # `run` too: a bad recipe is refused before converting
        found.append(_recipe_check(o, model))
    if o.mmproj and found[0].ok and model.vision_tower:
        found.append(_projector_check(o, model))
    limits = sorted({Target.from_key(key).value for key in o.targets if key.startswith("kld=")})
    if thorough and limits and model.evaluation is not None:
        found.append(_kld_target_precision(limits, model.evaluation.scored))
    return found


def _kld_target_precision(limits: list[float], scored: int) -> Check:
    """A --target-kld is held against the evaluation's measured mean KLD: how precise that
    measurement will be at each limit (the evaluation precision line quotes --max-kld's)."""
    at = ", ".join(f"± {kld_standard_error(k, scored):.2g} at {k:g}" for k in limits)
    return Check("budget precision", True, f"--target-kld is checked on the measured mean KLD of {scored:,} "
                 f"evaluation tokens: a standard error of about {at}; a file within about "
                 f"{NOISE_SIGMAS:g} standard errors of its limit may measure on either side of it (more "
                 "--eval-tokens narrows it)")


def _projector_check(o: Options, model: ModelInfo) -> Check:
    """A vision model: the pinned converter writes its projector (``--mmproj``) and the build has
    llama-mtmd-cli to validate it; else the run is refused before any work (``--no-mmproj``
    makes the text model alone)."""
    arch = model.architecture
    if arch not in mmproj_architectures():
        return Check("vision projector", False, f"{arch} has a vision tower, and the pinned converter cannot write its "
                     "projector (mmproj)", UnsupportedModelError(
                         f"the pinned llama.cpp converter writes no vision projector (mmproj) for {arch}",
                         hint="Pass --no-mmproj to make the text model alone."))
    folder = model.source.path
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        error = UnsupportedModelError(f"{arch} has a vision tower, and {folder} has no preprocessor_config.json (its "
                                      "image size, mean and deviation go into the projector)",
                                      hint="Fetch it with the model (the Hub repo has it), or pass --no-mmproj to make "
                                      "the text model alone.")
        return Check("vision projector", False, error.message, error)
    try:
        find_toolchain().tool("llama-mtmd-cli")
    except ToolchainMissingError as exc:
        return Check("vision projector", False, f"{exc.message} ({exc.hint})", exc)
    return Check("vision projector", True, f"a vision model: mmproj-{model.source.name}-{o.mmproj_type.upper()}.gguf "
                 "is written beside the text files and validated with one of them in llama-mtmd-cli")


def _unsupported(arch: str | None) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"architecture {arch} is not supported by the pinned llama.cpp converter",
        hint="`qwrap formats --architectures` lists what is; a newer llama.cpp may add it "
        "(QWRAP_LLAMA_CPP_DIR).",
    )


def _architecture_check(model: ModelInfo) -> Check:
    arch = model.architecture
    try:
        supported = supported_architectures()
    except QwrapError as exc:  # an unreadable registry is not a refusal: the converter will say
        return Check("architecture", False, f"cannot read the converter's list: {exc.message}")
    ok = arch in supported
    return Check("architecture", ok, f"{arch} is {'' if ok else 'not '}supported by the pinned converter",
                 None if ok else _unsupported(arch))


def _tokenizer_check(model: ModelInfo) -> Check:
    """A vocab-only conversion (seconds, no weights needed) catches tokenizers the pinned
    converter rejects, such as unknown BPE pre-tokenizers, before hours of work. A pass is
    remembered beside the tensor listings, keyed like them by the model's fingerprint (its
    tokenizer files' contents) and the converter: planning the same model again costs no
    conversion (the converter imports torch: seconds). A refusal is never remembered."""
    try:
        tools = find_toolchain()
        converter = tools.converter
        python = find_env("convert").python
    except QwrapError as exc:
        return Check("tokenizer", False, f"not checked: {exc.message}")
    passed = Check("tokenizer", True, "the pinned converter accepts the tokenizer")
    key = hashlib.sha256(f"vocab\0{model.fingerprint}\0{tools.commit}\0{converter}\0{python}".encode()).hexdigest()
    remembered = cache_root() / "tensors" / f"{model.source.name}-vocab-{key[:24]}.json"
    if remembered.is_file():
        return passed
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"vocab-check-{model.source.name}.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwrap-vocab-") as tmp:
        try:
            run_checked([python, converter, model.source.path, "--vocab-only", "--outfile", Path(tmp) / "v.gguf"],
                        what="vocab-only conversion", log_path=log, timeout=600)
        except QwrapError as exc:
            return Check("tokenizer", False, exc.message, exc)
    remembered.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = remembered.with_name(f"{remembered.name}.{os.getpid()}.partial")
    tmp_file.write_text(json.dumps({"tokenizer": "accepted"}))
    os.replace(tmp_file, remembered)
    _prune(remembered.parent)
    return passed


def _weights_here(path: Path) -> bool:
    """The model folder holds its weights (a Hub model planned before its download does not)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        return bool(shards) and all((path / s).is_file() for s in shards)
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def gguf_tensors(model: ModelInfo) -> dict[str, tuple[int, ...]]:
    """Every tensor the pinned converter writes for this model, GGUF name -> shape (GGUF order),
    as its ``--dry-run`` lists them: lazy tensors, no weight read, nothing written (MoE experts
    come out merged, as ``blk.N.ffn_*_exps``, exactly as the conversion will write them). A
    few seconds (the converter imports torch), so cached by the model's fingerprint and the
    converter."""
    tools = find_toolchain()
    converter = tools.converter
    python = find_env("convert").python
    key = hashlib.sha256(f"{LISTING_VERSION}\0{model.fingerprint}\0{tools.commit}\0{converter}".encode()).hexdigest()
    cached = cache_root() / "tensors" / f"{model.source.name}-{key[:24]}.json"
    try:
        return {n: tuple(s) for n, s in json.loads(cached.read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"tensor-listing-{model.source.name}.log"
    log.unlink(missing_ok=True)
    found: dict[str, tuple[int, ...]] = {}

    def line(text: str) -> None:
        m = _LISTED.match(text)
        if m:
            found[m[1]] = tuple(int(d) for d in m[2].replace(",", " ").split())

    with tempfile.TemporaryDirectory(prefix="qwrap-listing-") as tmp:
        run_checked([python, converter, model.source.path, "--dry-run", "--outtype", "f16",
                     "--outfile", Path(tmp) / "listing.gguf"],
                    what="the converter's dry run (the model's GGUF tensor names and shapes)", log_path=log,
                    on_line=line, env={"PYTHONUNBUFFERED": "1"}, timeout=600)
    if not found:
        raise ValidationFailedError("the converter's dry run listed no tensors", hint=f"See {log}.", log_path=str(log))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    tmp_file.write_text(json.dumps({n: list(s) for n, s in found.items()}))
    os.replace(tmp_file, cached)
    _prune(cached.parent)
    return found


def _prune(folder: Path, keep: int = LISTINGS_KEPT) -> None:
    """The cache keeps the newest listings (a local folder's fingerprint changes with its files)."""
    try:
        listings = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in listings[keep:]:
            old.unlink(missing_ok=True)
    except OSError:  # another process pruning at the same time
        pass


def imatrix_possible(o: Options, quant: str) -> bool:
    """Whether this run may give ``quant`` an importance matrix (steps.py decides it; by default
    it depends on calibration text, known only once the texts are fetched: assumed then)."""
    if o.imatrix == NO_IMATRIX:
        return False
    if o.imatrix is not None:
        return quant not in IMATRIX_IGNORED
    return quant.startswith(IMATRIX_BY_DEFAULT) or QUANT_TYPES[quant].needs_imatrix


def _recipe_check(o: Options, model: ModelInfo) -> Check:
    """The recipe against this model's GGUF tensors, before any conversion: every rule decides
    a tensor llama-quantize quantizes, with a type its rows take, and an importance matrix
    where its type needs one (``recipes.check``, naming the line)."""
    from .recipes import check, check_quants, load, quantized_tensors

    assert o.recipe is not None
    try:
        recipe = load(Path(o.recipe))
        quants = [normalize_quant(q) for q in o.quants]
        check_quants(quants, f"--recipe {o.recipe}")
    except QwrapError as exc:
        return Check("recipe", False, exc.message, exc)
    if not _weights_here(model.source.path):
        return Check("recipe", False, "not checked yet: the weights are not downloaded (`qwrap run` checks it "
                     "before converting)")
    try:
        listed = gguf_tensors(model)
    except ToolchainMissingError as exc:  # `run` says so next, with the command that sets it up
        return Check("recipe", False, f"not checked: {exc.message}")
    except QwrapError as exc:  # the conversion would fail the same way: refused now, not after hours
        return Check("recipe", False, f"listing the model's GGUF tensors failed: {exc.message}", exc)
    # (the GGUF architecture's own exclusions, glm5-next's, are applied at the quantize step)
    tensors = quantized_tensors(listed.items())
    try:
        for quant in quants:
            check(recipe, tensors, imatrix=imatrix_possible(o, quant))
    except QwrapError as exc:
        return Check("recipe", False, exc.message, exc)
    return Check("recipe", True, f"{len(recipe.rules)} rule(s) of {Path(o.recipe).name} fit this model's "
                 f"{len(tensors)} quantized GGUF tensors")
