"""Local folder or Hub id -> a local folder with config, tokenizer and (optionally) weights.

All network work goes through huggingface_hub (``resolve_revision``, ``snapshot_download``,
``get_safetensors_metadata``); this module only chooses *which* files to fetch and turns the
library's exceptions into qwrap errors with a next step. huggingface_hub resolves the token
(explicit > ``HF_TOKEN`` > stored login), the cache (``HF_HOME``/``HF_HUB_CACHE``), the endpoint
(``HF_ENDPOINT``) and ``HF_HUB_OFFLINE``; it reads the last three once, at import time.

The token is never logged or put in a message; messages are also scrubbed of it in case a
server echoes it back.
"""

from __future__ import annotations

import errno
import glob
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qwrap.errors import (
    AuthError,
    InsufficientDiskError,
    ModelFilesError,
    ModelNotFoundError,
    OfflineError,
    QwrapError,
    UnsupportedModelError,
)
from qwrap.modelfiles import ModelSource

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub._revision import ResolvedRevision
    from huggingface_hub.errors import HfHubHTTPError


log = logging.getLogger(__name__)

# Everything a conversion needs besides the weights. Indexes are tiny and tell which shards
# matter (repos such as Mistral's also ship a duplicate consolidated.safetensors).
META_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template*",
    "preprocessor_config.json",  # a vision model's image settings: its projector (mmproj) carries them
    "processor_config.json",
    "*.py",  # a model's own code (auto_map): refused unless --trust-remote-code, never run by qwrap itself
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_NOT_WEIGHTS = frozenset({"training_args.bin"})
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


def resolve_model(
    model: str, *, revision: str | None = None, token: str | None = None, weights: bool = True
) -> ModelSource:
    """A local folder as is, or a Hub id downloaded (config + tokenizer [+ weights]) into the HF cache."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _local_source(folder)
    if _looks_like_path(model) or not _REPO_ID.match(model):
        raise ModelNotFoundError(
            f"model folder '{model}' does not exist",
            hint="Pass an existing folder that holds config.json, or a Hub id such as "
            "'meta-llama/Llama-3.2-1B' (organization/name).",
        )
    return _hub_source(model, revision=revision, token=token, weights=weights)


def _local_source(folder: Path) -> ModelSource:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"'{folder}' has no config.json, so it is not a Hugging Face model folder",
            hint="Point at the folder that holds config.json, the tokenizer and the weights "
            "(for a Hub download that is the snapshot folder, not the cache root).",
        )
    resolved = folder.resolve()
    return ModelSource(path=resolved, name=resolved.name, repo_id=None, revision=None)


def _looks_like_path(model: str) -> bool:
    # "models/llama" where ./models exists means a local folder that is missing, not a Hub id.
    first = Path(model).expanduser().parts[0] if model else ""
    return model.startswith((".", "/", "~", "\\")) or (first != model and Path(first).exists())


# -- Hub ---------------------------------------------------------------------------------


def _hub_source(
    repo_id: str, *, revision: str | None, token: str | None, weights: bool
) -> ModelSource:
    with _hub_errors(repo_id, revision, token):
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        rev = api.resolve_revision(repo_id, revision=revision, local_files_only=_offline())
        folder = _download(api, repo_id, rev, META_PATTERNS)
        if weights:
            files = _weight_files(_repo_files(api, repo_id, rev, folder), folder, repo_id)
            _download(api, repo_id, rev, [glob.escape(f) for f in files])
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(
            f"Hub repo '{repo_id}' has no config.json at its root",
            hint="qwrap needs a transformers model repo (config.json + weights); GGUF-only or "
            "adapter repos cannot be quantized.",
        )
    return ModelSource(
        path=folder, name=repo_id.split("/")[-1], repo_id=repo_id, revision=rev.resolved
    )


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _download(api: HfApi, repo_id: str, rev: ResolvedRevision, patterns: Iterable[str]) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id,
        revision=rev,
        allow_patterns=list(patterns),
        token=api.token,
        endpoint=api.endpoint,
        local_files_only=_offline(),
    )
    return Path(path)


def _repo_files(api: HfApi, repo_id: str, rev: ResolvedRevision, folder: Path) -> list[str]:
    """The repo's file list, from the tree listing snapshot_download just cached (no request)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=rev)]
    except CachedRepoTreeNotFoundError:
        # huggingface_hub ignores errors writing that cache (e.g. a read-only HF_HOME): ask the Hub.
        if not _offline():
            return api.list_repo_files(repo_id, revision=rev.resolved)
        # Offline with a snapshot cached by an older huggingface_hub: what is on disk is all there is.
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _weight_files(files: list[str], folder: Path, repo_id: str) -> list[str]:
    """Safetensors shards (per the index when there is one); .bin only when there is no safetensors."""
    root = [f for f in files if "/" not in f and f not in _NOT_WEIGHTS]
    for suffix, index in ((".safetensors", SAFETENSORS_INDEX), (".bin", BIN_INDEX)):
        found = [f for f in root if f.endswith(suffix)]
        if not found:
            continue
        if suffix == ".bin":
            log.warning("%s has no safetensors weights; downloading PyTorch .bin files", repo_id)
        if index in root:
            return _index_shards(folder / index, repo_id)
        single = "model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin"
        return [single] if single in found else found
    raise UnsupportedModelError(
        f"Hub repo '{repo_id}' has no *.safetensors or *.bin weights at its root",
        hint="qwrap converts transformers checkpoints; a repo that only ships GGUF, ONNX or "
        "adapter weights needs its base model instead.",
    )


def _index_shards(index: Path, repo_id: str) -> list[str]:
    from .modelfiles import BadFile, read_index

    try:
        return read_index(index)
    except (BadFile, OSError) as exc:
        raise ModelFilesError(f"{index}: {exc}", hint=f"Remove {index.resolve()} (the cached copy) and fetch it again "
                              f"with `hf download {repo_id} {index.name} --force-download`, then run the same "
                              "command.") from None


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub / httpx / disk exceptions into qwrap errors with a next step."""
    try:
        yield
    except QwrapError:
        raise
    except Exception as exc:
        mapped = _map_error(exc, repo_id, revision)
        if mapped is None:
            raise
        hint = _scrub(mapped.hint, token) if mapped.hint else None
        raise type(mapped)(_scrub(mapped.message, token), hint=hint) from exc


def _map_error(exc: BaseException, repo_id: str, revision: str | None) -> QwrapError | None:
    import httpx
    from huggingface_hub import errors as hf

    http = _http_cause(exc)
    status = http.response.status_code if http is not None else None
    rev = revision or "main"
    if isinstance(http, hf.GatedRepoError):
        return AuthError(
            f"'{repo_id}' is a gated model and this account has no access to its files",
            hint=f"Request access on the model page ({_endpoint()}/{repo_id}), then pass --token "
            "or set HF_TOKEN with a token of the account that was granted access.",
        )
    if isinstance(http, hf.RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision '{rev}' does not exist in '{repo_id}'",
            hint="Check the branch, tag or commit (the model page's 'Files and versions' tab lists "
            "them), or drop --revision to use the default branch.",
        )
    if isinstance(http, hf.RepositoryNotFoundError) and status == 401:
        return AuthError(
            f"Hub repo '{repo_id}' was not found, or it is private and no token was sent",
            hint=f"Check the spelling of '{repo_id}'. If the repo is private, run `hf auth login` "
            "or set HF_TOKEN (or pass --token).",
        )
    if isinstance(http, hf.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"Hub repo '{repo_id}' does not exist (or this token cannot see it)",
            hint=f"Check the spelling of '{repo_id}'; private repos need a token with read access.",
        )
    if status in (401, 403):
        return AuthError(
            f"the Hub refused the token (HTTP {status})",
            hint="The token is invalid, expired or lacks read access: create one at "
            f"{_endpoint()}/settings/tokens, then pass --token, set HF_TOKEN or run `hf auth login`.",
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return InsufficientDiskError(
            f"the disk filled up while downloading '{repo_id}'",
            hint="Free space in the Hugging Face cache (`hf cache rm`) or point HF_HOME at a bigger disk.",
        )
    offline = (hf.RevisionResolutionError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)
    if isinstance(exc, (*offline, httpx.TransportError)) or (status or 0) >= 500:
        return _offline_error(f"'{repo_id}' (revision '{rev}')")
    if isinstance(exc, hf.HFValidationError):
        return ModelNotFoundError(f"'{repo_id}' is not a valid Hub id: {exc}")
    return None


def _offline_error(what: str) -> OfflineError:
    if _offline():
        return OfflineError(
            f"HF_HUB_OFFLINE is set and {what} is not (completely) in the local Hugging Face cache",
            hint="Pass a local model folder, or unset HF_HUB_OFFLINE so it can be downloaded.",
        )
    return OfflineError(
        f"cannot download {what}: the Hub at {_endpoint()} is unreachable or failing, "
        "and the files are not in the local cache",
        hint="Check the network connection, set HF_ENDPOINT to a reachable mirror, or pass a "
        "local model folder (HF_HUB_OFFLINE=1 uses cached downloads only).",
    )


def _http_cause(exc: BaseException) -> HfHubHTTPError | None:
    """The Hub's HTTP answer behind ``exc``, also when huggingface_hub wrapped it as 'not cached'."""
    from huggingface_hub import errors as hf

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, hf.HfHubHTTPError):
            return seen
        seen = seen.__cause__
    return None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _scrub(text: str, token: str | None) -> str:
    from huggingface_hub import get_token

    for secret in {token, get_token()}:
        if secret:
            text = text.replace(secret, "***")
    return text


# -- planner helpers ------------------------------------------------------------------------


def parameter_counts(source: ModelSource, *, token: str | None = None) -> dict[str, int]:
    """Parameters per safetensors dtype ("BF16": 1_235_814_400, ...), without loading weights.

    Local shards are read directly (their JSON header); for a Hub model downloaded with
    ``weights=False`` the headers are fetched with HTTP range requests. Empty for .bin models.
    """
    names = [p.name for p in source.path.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        shards = _weight_files(
            names, source.path, source.name
        )  # skips duplicates like consolidated.*
        return _sum_counts(_header_counts(source.path / n) for n in shards)
    if source.repo_id is None:
        return {}
    with _hub_errors(source.repo_id, source.revision, token):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import NotASafetensorsRepoError

        try:
            meta = HfApi(token=token).get_safetensors_metadata(
                source.repo_id, revision=source.revision
            )
        except NotASafetensorsRepoError:
            return {}
    return {str(k): int(v) for k, v in meta.parameter_count.items()}


def layer_inputs(source: ModelSource, *, token: str | None = None) -> dict[int, str]:
    """The input widths of the decoder layers' matrices (a linear layer's weight is [out, in]),
    each with the first tensor that has it, from the safetensors headers (local, or the Hub's
    metadata for a model fetched without its weights); empty when there are none. What a
    quantizer's group size must divide."""
    names = [p.name for p in source.path.iterdir()]
    shapes: dict[str, tuple[int, ...]] = {}
    if any(n.endswith(".safetensors") for n in names):
        from .modelfiles import read_header

        for n in _weight_files(names, source.path, source.name):
            shapes |= {k: t.shape for k, t in read_header(source.path / n).tensors.items()}
    elif source.repo_id is not None:
        with _hub_errors(source.repo_id, source.revision, token):
            from huggingface_hub import HfApi
            from huggingface_hub.errors import NotASafetensorsRepoError

            try:
                meta = HfApi(token=token).get_safetensors_metadata(source.repo_id, revision=source.revision)
            except NotASafetensorsRepoError:
                return {}
        shapes = {k: tuple(t.shape) for f in meta.files_metadata.values() for k, t in f.tensors.items()}
    found: dict[int, str] = {}
    for name, shape in sorted(shapes.items()):
        if ".layers." in name and name.endswith(".weight") and len(shape) == 2 and "norm" not in name:
            found.setdefault(int(shape[1]), name)
    return found


def _header_counts(path: Path) -> dict[str, int]:
    from .modelfiles import read_header

    counts: dict[str, int] = {}
    for t in read_header(path).tensors.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.elements
    return counts


def _sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for dtype, n in part.items():
            total[dtype] = total.get(dtype, 0) + n
    return total
