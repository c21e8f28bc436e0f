"""The supervisor against real child processes (sys.executable -c ...), like nox's tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from qwrap import supervisor


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_lines_split_on_cr_and_nl_and_logged(tmp_path: Path) -> None:
    lines: list[str] = []
    log = tmp_path / "step.log"
    result = supervisor.run(
        py("""
        import sys
        for i in range(3):
            sys.stderr.write(f"\\rWriting {i}"); sys.stderr.flush()
        sys.stderr.write("\\n"); print("done"); sys.exit(3)
        """),
        on_line=lines.append, log_path=log,
    )
    assert result.returncode == 3 and not result.ok
    assert lines == ["Writing 0", "Writing 1", "Writing 2", "done"]
    assert "Writing 2" in log.read_text() and "done" in log.read_text()
    assert result.tail[-1] == "done"


def test_events_arrive_on_their_own_channel() -> None:
    lines: list[str] = []
    events: list[str] = []
    supervisor.run(
        py("""
        import os
        print("library noise")
        fd = int(os.environ["QWRAP_EVENT_FD"])
        os.write(fd, b'{"event": "layer_done", "index": 0}\\n')
        """),
        on_line=lines.append, on_event=events.append,
    )
    assert lines == ["library noise"]
    assert events == ['{"event": "layer_done", "index": 0}']


def test_stdin_closed_own_session_and_env_blocklist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    lines: list[str] = []
    supervisor.run(
        py("""
        import os, sys
        print(repr(sys.stdin.read()))
        print(os.getsid(0) == os.getpid())
        print(os.environ.get("HF_TOKEN"), os.environ.get("EXTRA"), os.environ.get("HOME") is None)
        """),
        env={"EXTRA": "x", "HOME": None}, on_line=lines.append,
    )
    assert lines == ["''", "True", "None x True"]


@pytest.mark.heavy
def test_peak_rss_covers_the_whole_tree() -> None:
    result = supervisor.run(
        py("""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(2.5)"])
        """)
    )
    assert result.peak_rss_bytes > 200 * 2**20


def test_stall_timeout_kills_silent_child() -> None:
    started = time.monotonic()
    result = supervisor.run(py("import time; print('hi', flush=True); time.sleep(60)"), stall_timeout=1.0)
    assert result.stalled and result.returncode != 0
    assert time.monotonic() - started < 15


def test_signal_is_forwarded_and_escalates(tmp_path: Path) -> None:
    """A child that ignores SIGINT gets SIGTERM after the grace period."""
    marker = tmp_path / "child.pid"
    code = f"""
        import os, signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        open({str(marker)!r}, "w").write(str(os.getpid()))
        print("ready", flush=True)
        time.sleep(60)
    """
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    result = supervisor.run(py(code), stop_policy=supervisor.StopPolicy(0.5, 0.5))
    timer.join()
    assert result.stopped_by_signal == signal.SIGINT
    assert result.returncode == -signal.SIGTERM
    assert not psutil.pid_exists(int(marker.read_text())) or \
        psutil.Process(int(marker.read_text())).status() == psutil.STATUS_ZOMBIE


def test_child_dies_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed qwrap does not leave its tool running."""
    marker = tmp_path / "grandchild.pid"
    parent = subprocess.Popen(py(f"""
        import sys
        from qwrap import supervisor
        supervisor.run([sys.executable, "-c",
            "import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"])
    """))
    deadline = time.monotonic() + 20
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(marker.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "child outlived its SIGKILLed parent"
        time.sleep(0.05)


def test_reap_orphans_matches_create_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    created = psutil.Process(proc.pid).create_time()
    assert not supervisor.reap_orphans(proc.pid, created + 100)  # a recycled pid is left alone
    assert proc.poll() is None
    assert supervisor.reap_orphans(proc.pid, created)
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_relevant_lines_prefers_errors() -> None:
    tail = [f"noise {i}" for i in range(50)] + ["ValueError: Model FooForCausalLM is not supported"] + ["bye"]
    picked = supervisor.relevant_lines(tail, limit=4)
    assert "ValueError: Model FooForCausalLM is not supported" in picked
    assert picked[-1] == "bye" and len(picked) <= 4


def test_pty_mode_reads_output() -> None:
    lines: list[str] = []
    result = supervisor.run(["sh", "-c", "test -t 1 && echo tty; echo there"], use_pty=True, on_line=lines.append)
    assert result.ok and lines == ["tty", "there"]


def test_child_that_closes_its_output_is_still_supervised() -> None:
    """Output closed early, process still running: the stall deadline still applies."""
    code = "import os, time; print('bye', flush=True); os.close(1); os.close(2); time.sleep(60)"
    started = time.monotonic()
    result = supervisor.run(py(code), stall_timeout=1.0)
    assert result.stalled and time.monotonic() - started < 15


def test_peak_rss_of_a_short_tool_is_exact() -> None:
    """A tool that finishes between two samples still reports its real peak (wait4)."""
    result = supervisor.run(py("b = bytearray(150 * 2**20)"))
    assert result.peak_rss_bytes > 150 * 2**20


def test_a_child_whose_qwrap_died_before_it_could_ask_for_the_signal_ends_itself() -> None:
    """PR_SET_PDEATHSIG set after the parent is already gone never fires: the child, handed to
    another parent, ends itself before exec. With its own parent it runs on."""
    me = os.getpid()
    own = subprocess.run(py("print('ran')"), capture_output=True, text=True, timeout=30,  # noqa: PLW1509
                         preexec_fn=lambda: supervisor._set_parent_death_signal(me))
    assert own.returncode == 0 and own.stdout == "ran\n"
    gone = subprocess.run(py("print('ran')"), capture_output=True, text=True, timeout=30,  # noqa: PLW1509
                          preexec_fn=lambda: supervisor._set_parent_death_signal(me + 1))
    assert gone.returncode == -signal.SIGKILL and gone.stdout == ""
