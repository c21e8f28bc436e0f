"""Uploading a finished run to the Hub: the files a push sends (``Upload``), what it did
(``PushResult``) and ``upload``: one commit through huggingface_hub's public API, files already
on the branch with the same sha256 not sent again, errors mapped to exit codes 4/5/18/19.

Which files a run publishes, and what must not be published, is publish.py's business; the
token is never logged or put in a message (messages are scrubbed of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AuthError, NotPublishableError, OfflineError, QwrapError, WriteAccessError
from .hub import _endpoint, _http_cause, _offline, _scrub

if TYPE_CHECKING:
    from huggingface_hub import HfApi


@dataclass(frozen=True)
class Upload:
    path_in_repo: str
    local: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_url: str | None  # None: nothing changed, so no commit was made
    pr_url: str | None
    uploaded: tuple[str, ...]
    unchanged: tuple[str, ...]
    bytes_uploaded: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def upload(files: list[Upload], repo_id: str, *, token: str | None, private: bool, revision: str | None,
           create_pr: bool, message: str) -> PushResult:
    """One commit with ``files`` on ``revision`` (or a pull request against it), through
    huggingface_hub's public API; files already there with the same sha256 are not sent."""
    if _offline():
        raise OfflineError("HF_HUB_OFFLINE is set, and pushing needs the Hub",
                           hint="Unset HF_HUB_OFFLINE (the files stay ready in the output folder).")
    with _push_errors(repo_id, token):
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        unchanged = _unchanged(api, repo_id, revision, files)
        todo = [f for f in files if f.path_in_repo not in unchanged]
        commit = pr = None
        if todo:
            ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local)) for f in todo]
            info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, create_pr=create_pr)
            commit, pr = info.commit_url, info.pr_url
    return PushResult(repo_id, revision or "main", commit, pr, tuple(f.path_in_repo for f in todo),
                      tuple(sorted(unchanged)), sum(f.size for f in todo))


def _unchanged(api: HfApi, repo_id: str, revision: str | None, files: list[Upload]) -> set[str]:
    """The files the branch already holds with the same content: the LFS sha256, or the git
    blob id for small files the Hub stores in git."""
    from huggingface_hub.hf_api import RepoFile

    local = {f.path_in_repo: f for f in files}
    same: set[str] = set()
    for entry in api.get_paths_info(repo_id, list(local), revision=revision):
        if not isinstance(entry, RepoFile) or entry.path not in local:
            continue
        mine = local[entry.path]
        if (entry.lfs.sha256 if entry.lfs else entry.blob_id) in (mine.sha256, _git_blob_id(mine.local)):
            same.add(entry.path)
    return same


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _push_errors(repo_id: str, token: str | None) -> Iterator[None]:
    """huggingface_hub / httpx exceptions of a push -> qwrap errors with the fix, token scrubbed."""
    try:
        yield
    except QwrapError:
        raise
    except Exception as exc:
        mapped = _map_push_error(exc, repo_id)
        if mapped is None:
            raise
        hint = _scrub(mapped.hint, token) if mapped.hint else None
        raise type(mapped)(_scrub(mapped.message, token), hint=hint) from exc


def _map_push_error(exc: BaseException, repo_id: str) -> QwrapError | None:
    import httpx

    http = _http_cause(exc)
    status = http.response.status_code if http is not None else None
    tokens = f"{_endpoint()}/settings/tokens"
    if status == 401:
        return AuthError(f"the Hub did not accept a token for pushing to '{repo_id}' (HTTP 401: none sent, or "
                         "invalid or expired)",
                         hint=f"Create a token with write access at {tokens}, then pass --token, set HF_TOKEN or run "
                         "`hf auth login`.")
    if status == 403:
        server = (http.server_message if http is not None else "") or ""
        return WriteAccessError(f"this token cannot write to '{repo_id}' (HTTP 403{': ' + server if server else ''})",
                                hint=f"Use a token with write access to '{repo_id.split('/')[0]}' ({tokens}; a "
                                "fine-grained token needs write on that namespace), push to a repo of your own, or "
                                "pass --create-pr where the owner accepts pull requests.")
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        return NotPublishableError(f"the Hub rejected the model card's front matter: {exc}",
                                   hint="Pass --base-model ORG/NAME (a Hub id) or leave it out.")
    if isinstance(exc, httpx.TransportError) or (status or 0) >= 500:
        return OfflineError(f"cannot push to '{repo_id}': the Hub at {_endpoint()} is unreachable or failing "
                            f"({type(exc).__name__})",
                            hint="Check the connection and run the same push again: files already uploaded are "
                            "not sent twice.")
    return None
