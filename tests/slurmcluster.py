"""A real single-node Slurm for the tests: munged, slurmctld and slurmd started from a config
written into a temp folder (Debian's slurm-wlm; see shared notes on what a single node needs),
stopped again at the end. Clients find it through SLURM_CONF."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    absent = [d for d in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel") if not shutil.which(d)
              and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing; `make slurm` installs Debian's slurm-wlm)"
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512
    return 2048


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment as it is now: jobs get the submitting test's (HF_HUB_OFFLINE, HF_HOME)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _config(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=qwraptest", f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            "SlurmUser=root", "SlurmdUser=root", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none",
            # schedule as soon as a job ends (the defaults batch that by 3 s, backfill every 30 s):
            # a plan's stages follow one another without waiting for the scheduler's next pass
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2", "KillWait=10",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job`
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            f"NodeName={self.host} CPUs={os.cpu_count() or 1} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    def start(self) -> None:
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(self._config())
        self._spawn(["munged", "-F", "-f", f"--socket={self.socket}", f"--key-file={key}",
                     f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--seed-file={munge / 'munged.seed'}"], self.socket)
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)], None)
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], None)
        self._wait_idle()

    def _spawn(self, argv: list[str], wait_for: Path | None) -> None:
        exe = shutil.which(argv[0]) or f"/usr/sbin/{argv[0]}"
        with (self.root / f"{argv[0]}.out").open("wb") as log:  # the daemon keeps its own copy of the fd
            self.procs.append(subprocess.Popen([exe, *argv[1:]], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=self.env, start_new_session=True))
        deadline = time.monotonic() + 30
        while wait_for is not None and not wait_for.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"{argv[0]} did not start: {self.logs()}")
            time.sleep(0.1)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node never became idle: {self.logs()}")

    def run(self, *argv: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, check=check, cwd=cwd,
                              stdin=subprocess.DEVNULL, timeout=120)

    def submit(self, script: Path, env: dict[str, str] | None = None) -> dict[str, str]:
        """Run a submit.sh (its jobs inherit ``env``, default the environment as it is now):
        script name -> job id."""
        full = self.env if env is None else {**env, "SLURM_CONF": str(self.conf)}
        proc = subprocess.run([str(script)], capture_output=True, text=True, env=full, timeout=120,
                              stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise RuntimeError(f"{script} failed: {proc.stdout}{proc.stderr}")
        return dict(line.split() for line in proc.stdout.splitlines() if line.strip())

    def wait(self, jobs: list[str], timeout: float = 900) -> dict[str, str]:
        """Wait until none of ``jobs`` (or their array tasks) is pending or running; their
        final states by job id (an array's tasks as ``ID_N``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states(jobs)
            if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"Slurm jobs still not finished after {timeout:.0f} s: {self.states(jobs)}")

    def states(self, jobs: list[str]) -> dict[str, str]:
        states: dict[str, str] = {}
        for job in jobs:
            out = self.run("scontrol", "-o", "show", "job", job, check=False).stdout
            for line in out.splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                task = fields.get("ArrayTaskId")
                key = f"{fields.get('ArrayJobId')}_{task}" if task and task.isdigit() else fields.get("JobId", job)
                states[key] = fields.get("JobState", "?")
        return states

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
