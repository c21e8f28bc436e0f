from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwrap.errors import JournalError, LockedError
from qwrap.journal import Journal, StepRecord, StepState, describe_file, fingerprint_tree, verify_file
from qwrap.locks import StepLock, folder_lock, step_running


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


def hold(code: str) -> subprocess.Popen[str]:
    """A process that runs ``code`` (a with-statement header), says "locked" and sleeps."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from qwrap.locks import StepLock, folder_lock
{code}
    print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait()
    assert holder.stdout is not None
    holder.stdout.close()


def test_lock_excludes_a_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = hold(f"with folder_lock(Path({str(tmp_path)!r}), shared=False):")
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        with folder_lock(tmp_path, shared=False):
            pass
    with pytest.raises(LockedError, match="whole-plan"):  # a --step run waits for no whole-plan run either
        with folder_lock(tmp_path, shared=True):
            pass
    release(holder)
    with folder_lock(tmp_path, shared=False):  # a dead holder's lock is taken over
        assert (tmp_path / ".checkpoint" / "lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_step_runs_share_the_folder_and_exclude_a_whole_plan_run(tmp_path: Path) -> None:
    holder = hold(f"with folder_lock(Path({str(tmp_path)!r}), shared=True):")
    with folder_lock(tmp_path, shared=True):  # another --step run: fine
        pass
    with pytest.raises(LockedError, match="--step"):
        with folder_lock(tmp_path, shared=False):
            pass
    release(holder)


def test_a_step_lock_names_its_holder_and_is_free_once_it_dies(tmp_path: Path) -> None:
    holder = hold(f"lock = StepLock(Path({str(tmp_path)!r}), 'gguf.quantize:Q4_K_M')\nlock.acquire()\nif True:")
    assert step_running(tmp_path, "gguf.quantize:Q4_K_M") and not step_running(tmp_path, "gguf.convert")
    with pytest.raises(LockedError, match=f"gguf.quantize:Q4_K_M is already running \\(pid {holder.pid} on "):
        StepLock(tmp_path, "gguf.quantize:Q4_K_M").acquire()
    release(holder)
    assert not step_running(tmp_path, "gguf.quantize:Q4_K_M")
    lock = StepLock(tmp_path, "gguf.quantize:Q4_K_M")
    assert lock.try_acquire() is None
    lock.release()


@pytest.mark.heavy
def test_processes_appending_at_once_never_tear_a_line(tmp_path: Path) -> None:
    code = f"""
from pathlib import Path
from qwrap.journal import Journal, StepRecord, StepState
j = Journal(Path({str(tmp_path)!r}))
for n in range(200):
    j.record(StepRecord(f"s{{n}}", StepState.DONE, "x" * 3000, info={{"n": n}}))
    j.states()
"""
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    lines = Journal(tmp_path).path.read_bytes().split(b"\n")
    assert len([line for line in lines if line]) == 800 and all(json.loads(line) for line in lines if line)


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
