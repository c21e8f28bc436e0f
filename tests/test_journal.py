from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwrap.errors import JournalError, LockedError
from qwrap.journal import Journal, StepRecord, StepState, describe_file, fingerprint_tree, output_lock, verify_file


def test_records_fold_into_states(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record(StepRecord("a", StepState.STARTED, "fp1"))
    j.record(StepRecord("a", StepState.DONE, "fp1", info={"bytes": 3}, seconds=1.5))
    j.record(StepRecord("b", StepState.STARTED, "fp2"))
    states = j.states()
    assert states["a"].state is StepState.DONE and states["b"].state is StepState.STARTED
    assert states["a"].info == {"bytes": 3} and states["a"].seconds == 1.5
    assert all(json.loads(line)["v"] == 1 for line in j.path.read_text().splitlines())


def test_truncated_last_line_is_ignored_with_warning_and_repaired(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record(StepRecord("a", StepState.DONE, "fp"))
    with j.path.open("ab") as f:
        f.write(b'{"step": "b", "sta')  # a crash mid-write
    assert set(j.states()) == {"a"}
    assert j.warnings and "truncated" in j.warnings[0]
    j.record(StepRecord("c", StepState.DONE, "fp"))  # the next write starts on a fresh line
    assert set(Journal(tmp_path).states()) == {"a", "c"}


def test_corruption_elsewhere_is_a_clear_error(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.record(StepRecord("a", StepState.DONE, "fp"))
    j.path.write_text("garbage\n" + j.path.read_text())
    with pytest.raises(JournalError, match="line 1"):
        j.states()


def test_a_record_with_an_unknown_state_is_a_journal_error(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append({"step": "a", "state": "exploded", "fingerprint": "fp"})
    with pytest.raises(JournalError, match="cannot read"):
        j.states()


def test_newer_schema_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.dir.mkdir(parents=True)
    j.path.write_text(json.dumps({"v": 99, "step": "a", "state": "done"}) + "\n")
    with pytest.raises(JournalError, match="newer qwrap"):
        j.states()


def test_verify_file_detects_changes(tmp_path: Path) -> None:
    f = tmp_path / "a.gguf"
    f.write_bytes(b"x" * 100)
    entry = describe_file(f, tmp_path)
    assert verify_file(entry, tmp_path)
    f.write_bytes(b"y" * 100)  # same size, other content
    assert not verify_file(entry, tmp_path)
    f.unlink()
    assert not verify_file(entry, tmp_path)


def test_fingerprint_tree_sees_small_file_edits(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    before = fingerprint_tree(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert fingerprint_tree(tmp_path) != before


def test_lock_excludes_a_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import time
from pathlib import Path
from qwrap.journal import output_lock
with output_lock(Path({str(tmp_path)!r})):
    print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=str(holder.pid)):
        with output_lock(tmp_path):
            pass
    holder.kill()
    holder.wait()
    holder.stdout.close()
    with output_lock(tmp_path):  # a dead holder's lock is taken over
        assert (tmp_path / ".checkpoint" / "lock").read_text().strip() == str(os.getpid())


def test_folder_outputs_are_verified_file_by_file(tmp_path: Path) -> None:
    folder = tmp_path / "model-AWQ-4bit-g128"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 10)
    entry = describe_file(folder, tmp_path)
    assert entry["bytes"] == 12 and verify_file(entry, tmp_path)
    (folder / "config.json").write_text("[]")
    assert not verify_file(entry, tmp_path)


def test_scratch_files_are_pinned_by_size_and_mtime(tmp_path: Path) -> None:
    work = tmp_path / ".checkpoint" / "work"
    work.mkdir(parents=True)
    f = work / "model-BF16.gguf"
    f.write_bytes(b"x" * 10)
    entry = describe_file(f, tmp_path)
    assert "sha256" not in entry and verify_file(entry, tmp_path)
    os.utime(f, ns=(1, 1))
    assert not verify_file(entry, tmp_path)
