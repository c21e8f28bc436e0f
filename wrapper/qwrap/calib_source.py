"""Default texts: WikiText-2 (raw), fetched through huggingface_hub; its train split is the
default calibration text, its test split the default evaluation text.

Whether a split can be had is decided once, before the plan is built, the same way for `plan`,
`run` and every `--step` job (``unavailable``): it can when its parquet file is already in the
local Hugging Face cache, or when the Hub answers (``reach.hub()``, asked at most once per
process and within about 2 s). A split that cannot be had is never downloaded, so an
unreachable Hub costs no retries.

The Hub only serves this dataset as parquet, and neither huggingface_hub nor the stdlib can
read parquet, while the parent must not import pyarrow. So ``wikitext2()`` returns the cached
parquet file and the text is produced by a child worker in the converter environment (which
has pyarrow): run ``conversion_argv(parquet, python=...)`` through the supervisor unless
``text_path(parquet)`` already exists. The text is cached next to the parquet file, so the
conversion happens once per dataset revision.
"""

from __future__ import annotations

from pathlib import Path

from qwrap import reach
from qwrap.errors import OfflineError, UsageError

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_SPLITS = ("train", "validation", "test")
TRAIN_FILE = "wikitext-2-raw-v1/train-00000-of-00001.parquet"
TEST_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
_CALIB_HINT = "Pass --calib FILE with a plain text file to calibrate on instead."


def _filename(split: str) -> str:
    if split not in WIKITEXT_SPLITS:
        raise UsageError(
            f"unknown WikiText-2 split '{split}'", hint=f"Use one of {', '.join(WIKITEXT_SPLITS)}."
        )
    return f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"


def local_parquet(split: str = "train") -> Path | None:
    """The split's parquet file if it is in the local Hugging Face cache (asks no server)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(WIKITEXT_REPO, _filename(split), repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        return None


def unavailable(split: str = "train") -> str:
    """Why the split cannot be had, as a clause ("" when it can: cached here, or the Hub
    answers). The same for every split, so that one cause reads as one line."""
    if local_parquet(split) is not None:
        return ""
    hub = reach.hub()
    return "" if hub.ok else f"WikiText-2 is not in the local cache and {hub.describe()}"


def wikitext2(split: str = "train", *, token: str | None = None, local_only: bool = False) -> Path:
    """The cached WikiText-2 raw ``split`` parquet file: the local copy when there is one, else
    downloaded (unless ``local_only``, HF_HUB_OFFLINE, or a Hub that does not answer: then
    OfflineError, without a single retry)."""
    found = local_parquet(split)
    if found is not None:
        return found
    why = "it was asked for from the local cache only" if local_only else unavailable(split)
    if why:
        raise _missing(split, why)
    from httpx import TransportError
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(WIKITEXT_REPO, _filename(split), repo_type="dataset", token=token))
    except (LocalEntryNotFoundError, TransportError, HfHubHTTPError) as exc:
        # Whatever the cause (a dropped connection, missing on a mirror), the next step is the same.
        raise _missing(split, f"downloading it from {constants.ENDPOINT} failed ({type(exc).__name__})") from exc


def _missing(split: str, why: str) -> OfflineError:
    what = "the default calibration data" if split == "train" else f"the default {split} text"
    return OfflineError(f"cannot get {what} (WikiText-2 {split} from {WIKITEXT_REPO}): {why}", hint=_CALIB_HINT)


def text_path(parquet: Path) -> Path:
    """Where the plain text of ``parquet`` lives once converted (next to it, in the cache)."""
    return parquet.with_suffix(".txt")


def conversion_argv(parquet: Path, *, python: str) -> list[str]:
    """The child command that writes ``text_path(parquet)``; ``python`` must have pyarrow."""
    return [python, "-m", "qwrap.workers.parquet_text", str(parquet), str(text_path(parquet))]


def wikitext2_text(split: str = "train", *, token: str | None = None) -> Path:
    """A WikiText-2 split as a plain text file in the cache, converted once."""
    parquet = wikitext2(split, token=token)
    text = text_path(parquet)
    if not text.exists():
        from . import envs
        from .children import run_checked
        from .toolchain import cache_root

        python = str(envs.find_env("convert").python)
        run_checked(conversion_argv(parquet, python=python), what="turning the WikiText-2 parquet file into text",
                    log_path=cache_root() / "logs" / f"wikitext2-{split}-text.log", env={"PYTHONPATH": str(envs.worker_code())}, timeout=600)
    return text


def cached_text(split: str = "train") -> Path | None:
    """For `plan`, which downloads nothing: the split's text if it is already in the cache, else
    None (`run` converts or downloads it when ``unavailable`` says it can)."""
    parquet = local_parquet(split)
    text = text_path(parquet) if parquet is not None else None
    return text if text is not None and text.exists() else None
