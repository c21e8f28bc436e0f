"""Paths stay inside OUT: a hostile pre-existing layout (symbolic links at an artifact name, its
.partial, .checkpoint or a folder in it) is refused before anything is written (exit 21), and a
crafted journal (`..` in recorded outputs, a run header naming another output folder) never
makes qwrap write, rename or delete outside OUT. Everything outside OUT is snapshotted before
and compared after."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import Run, run_qwrap
from qwrap.errors import OutputPathError
from qwrap.journal import sha256_file
from qwrap.outpaths import is_plain_relative

ARTIFACT = "tiny-llama-Q8_0.gguf"
RUN = ("-q", "Q8_0", "--no-eval")


def snapshot(root: Path, skip: Path) -> dict[str, object]:
    """Every entry under ``root`` except ``skip``: file contents, link targets, folders."""
    seen: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        rel = str(path.relative_to(root))
        if path.is_symlink():
            seen[rel] = ("link", os.readlink(path))
        elif path.is_file():
            seen[rel] = (path.read_bytes(), path.stat().st_mtime_ns)
        else:
            seen[rel] = "dir"
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("where", [ARTIFACT, ARTIFACT + ".partial", ".checkpoint", ".checkpoint/work",
                                   ".checkpoint/logs", ".checkpoint/journal.jsonl"])
@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_where_qwrap_writes_is_refused(tiny_model: Path, tmp_path: Path, where: str, dangling: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    is_file = "." in Path(where).name and Path(where).name != ".checkpoint"
    target = outside / ("victim" if is_file else "victim-dir")
    if not dangling:
        target.write_text("keep me") if is_file else target.mkdir()
    out = tmp_path / "out"
    link = out / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    before = snapshot(tmp_path, out)
    proc = run_qwrap("run", str(tiny_model), "-o", str(out), *RUN, "--force")
    assert proc.returncode == OutputPathError.exit_code, proc.stderr
    text = " ".join(proc.stderr.split())
    assert f"{link} is a symbolic link (to {target})" in text and f"rm {link}" in text
    assert snapshot(tmp_path, out) == before
    assert not [p for p in out.rglob("*.gguf*") if not p.is_symlink()]  # refused before any step ran
    journal = out / ".checkpoint" / "journal.jsonl"
    if journal.is_file() and not journal.is_symlink():
        assert '"started"' not in journal.read_text()


def test_plain_relative() -> None:
    for good in ("a.gguf", ".checkpoint/work/x.gguf", "name.partial"):
        assert is_plain_relative(good)
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", "a\0b"):
        assert not is_plain_relative(bad), bad


@pytest.mark.slow
def test_a_crafted_journal_never_sends_writes_outside(gguf_run: Run, tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    shutil.copytree(gguf_run.out, out)  # a finished run of Q4_K_M and Q8_0
    elsewhere.mkdir()
    victim = elsewhere / "victim.gguf"
    victim.write_bytes(b"not a gguf, and it must stay that way")
    journal = out / ".checkpoint" / "journal.jsonl"
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    crafted: list[dict[str, object]] = []
    for record in records:
        r = dict(record)
        if r.get("kind") == "run":  # the run header says the output folder is elsewhere
            r["request"] = {**r["request"], "output": str(elsewhere)}
        if r.get("state") == "done":  # every output "is" the victim, reached through ..
            r["outputs"] = [{"path": "../elsewhere/victim.gguf", "bytes": victim.stat().st_size,
                             "sha256": sha256_file(victim)}]
        crafted.append(r)
    journal.write_text("".join(json.dumps(r) + "\n" for r in crafted))
    for artifact in out.glob("*.gguf"):
        artifact.unlink()
    before = snapshot(tmp_path, out)
    again = run_qwrap("resume", str(out), "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert sorted(a["path"] for a in result["artifacts"]) == [str(out / "tiny-llama-Q4_K_M.gguf"), str(out / ARTIFACT)]
    assert all(not a["reused"] for a in result["artifacts"])  # the crafted "done" records proved nothing
    assert (out / ARTIFACT).is_file()
    assert snapshot(tmp_path, out) == before
