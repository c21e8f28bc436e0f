"""Default calibration data: WikiText-2 (raw), fetched through huggingface_hub.

The Hub only serves this dataset as parquet, and neither huggingface_hub nor the stdlib can
read parquet, while the parent must not import pyarrow. So ``wikitext2()`` returns the cached
parquet file and the text is produced by a child worker in the converter environment (which
has pyarrow): run ``conversion_argv(parquet, python=...)`` through the supervisor unless
``text_path(parquet)`` already exists. The text is cached next to the parquet file, so the
conversion happens once per dataset revision.
"""

from __future__ import annotations

from pathlib import Path

from qwrap.errors import OfflineError, UsageError

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_SPLITS = ("train", "validation", "test")
TRAIN_FILE = "wikitext-2-raw-v1/train-00000-of-00001.parquet"
TEST_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
_CALIB_HINT = "Pass --calib FILE with a plain text file to calibrate on instead."


def wikitext2(split: str = "train", *, token: str | None = None, local_only: bool = False) -> Path:
    """The cached WikiText-2 raw ``split`` parquet file (downloaded on first use, unless
    ``local_only``)."""
    if split not in WIKITEXT_SPLITS:
        raise UsageError(
            f"unknown WikiText-2 split '{split}'", hint=f"Use one of {', '.join(WIKITEXT_SPLITS)}."
        )
    from httpx import TransportError
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    filename = f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"
    try:
        path = hf_hub_download(
            WIKITEXT_REPO,
            filename,
            repo_type="dataset",
            token=token,
            local_files_only=constants.HF_HUB_OFFLINE or local_only,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, TransportError, HfHubHTTPError) as exc:
        # Whatever the cause (offline, unreachable, missing on a mirror), the next step is the same.
        reason = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} failed"
        )
        raise OfflineError(
            f"cannot get the default calibration data (WikiText-2 from {WIKITEXT_REPO}): "
            f"{reason} and it is not in the local cache ({type(exc).__name__})",
            hint=_CALIB_HINT,
        ) from exc
    return Path(path)


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
    """The text of a WikiText-2 split if it is already in the cache (for `plan`, which downloads nothing)."""
    try:
        text = text_path(wikitext2(split, local_only=True))
    except OfflineError:
        return None
    return text if text.exists() else None


def planned_text(split: str = "train") -> Path | None:
    """For `plan`, which downloads nothing: the cached text of a split, or None when `run` would
    download it. Raises OfflineError when HF_HUB_OFFLINE is set and it is not cached."""
    from huggingface_hub import constants

    text = cached_text(split)
    if text is None and constants.HF_HUB_OFFLINE:
        raise OfflineError(f"HF_HUB_OFFLINE is set and WikiText-2 ({split}) is not in the cache")
    return text
