"""`qwrap push OUT REPO_ID` and `run --push-to`: what an output folder publishes, checked first.

A finished run leaves its result in ``OUT/.checkpoint/result.json``; a push reads it, refuses
what must not be published (an unvalidated artifact, a failed quality gate, what a format
says is unusable, e.g. an AWQ/GPTQ folder without quantization_config), rewrites the model
card (``--base-model``) and hands the files to ``hub_upload.upload``: one commit, files already on
the branch with the same sha256 not sent again. Each push is journaled (``kind: push``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import modelcard, results
from .errors import NotPublishableError, QwrapError
from .formats import FORMATS
from .hub_upload import PushResult, Upload, upload
from .journal import Journal, sha256_file
from .locks import folder_lock
from .results import RunResult

EXTRAS = ("quality.html", "quality.png")  # published with the artifacts when the run wrote them
IMATRIX = (".checkpoint/work/imatrix.gguf", "imatrix.gguf")  # kept with --keep-intermediate


def uploads(output: Path, result: RunResult) -> list[Upload]:
    """Every file to publish, artifacts first; raises NotPublishableError for what must not be."""
    files: list[Path] = []
    for a in result.artifacts:
        path = output / Path(a.path).relative_to(result.output)  # OUT may have moved
        if not a.validated:
            raise NotPublishableError(f"{a.name} ({path.name}) was not validated", hint="Run `qwrap run` again.")
        if a.gate == "failed":
            raise NotPublishableError(f"{a.name} ({path.name}) failed its --max-kld quality gate",
                                      hint="Publish only what passed: a run without that type, or a looser limit.")
        parts = [path.with_name(s.path) for s in a.shards] or [path]  # a split set goes whole
        for part in parts:
            reason = FORMATS[a.format].publishable(part) if a.format in FORMATS else "an unknown format"
            if reason:
                raise NotPublishableError(f"{a.name}: {reason}", hint="Run `qwrap run` again to remake it.")
            files += sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
        if a.recipe is not None:  # the per-tensor recipe it was made with, written beside it
            recipe = path.with_name(a.recipe.file)
            if not recipe.is_file():
                raise NotPublishableError(f"{a.name}: its recipe {recipe.name} is missing",
                                          hint="Run `qwrap run` again to remake it.")
            files.append(recipe)
    if result.projector is not None:  # a vision model's projector goes with its text files
        p = result.projector
        path = output / Path(p.path).relative_to(result.output)
        if not p.validated:
            raise NotPublishableError(f"the projector {path.name} was not validated", hint="Run `qwrap run` again.")
        reason = FORMATS[p.format].publishable(path) if p.format in FORMATS else "an unknown format"
        if reason:
            raise NotPublishableError(f"the projector: {reason}", hint="Run `qwrap run` again to remake it.")
        files.append(path)
    files += [output / "README.md", *(output / e for e in EXTRAS if (output / e).is_file())]
    listed = [Upload(p.relative_to(output).as_posix(), p, sha256_file(p), p.stat().st_size) for p in files]
    imatrix = output / IMATRIX[0]
    if imatrix.is_file():
        listed.append(Upload(IMATRIX[1], imatrix, sha256_file(imatrix), imatrix.stat().st_size))
    return listed


def push(output: Path, repo_id: str, *, token: str | None, private: bool = False, revision: str | None = None,
         create_pr: bool = False, base_model: str | None = None, say: Callable[[str], None]) -> PushResult:
    result = results.load(output)
    if base_model:
        result = result.with_base_model(base_model)
    with folder_lock(output, shared=False):
        if modelcard.write(result, output) is None:
            raise NotPublishableError(f"{output / 'README.md'} was not written by qwrap",
                                      hint="Move it aside: the pushed card must describe the files it is pushed with.")
        files = uploads(output, result)
        journal = Journal(output)
        record = {"kind": "push", "repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr}
        journal.append({**record, "state": "started", "files": [f.path_in_repo for f in files]})
        say(f"pushing {len(files)} files ({sum(f.size for f in files):,} bytes) to {repo_id}")
        try:
            pushed = upload(files, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                            message=f"qwrap: {result.model.name} quantized ({len(result.artifacts)} artifacts)")
        except QwrapError as exc:
            journal.append({**record, "state": "failed", "error": exc.message})
            raise
        journal.append({**record, "state": "done", **pushed.to_json()})
    return pushed
