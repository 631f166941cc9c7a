"""Fixtures shared by every test: real servers on loopback and a guard that
fails any test leaving shared memory behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

pytest_plugins = ["psana2_helpers"]   # the psana2 runs are written once per session

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
# Not ours: POSIX semaphores and torch's DataLoader files; MPI's segments are
# ours to clean (psana2 workers finalize MPI) and so are checked.
_FOREIGN = ("sem.", "pym-", "torch_")


def shm_entries() -> set:
    return {p.name for p in SHM.iterdir() if not p.name.startswith(_FOREIGN)}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail a test that leaves a segment in /dev/shm (after a short grace for
    servers that are still unlinking)."""
    before = shm_entries()
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = shm_entries() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in leaked:  # leave the machine clean for the next test, then fail
        (SHM / name).unlink(missing_ok=True)
    assert not leaked, f"test left shared memory behind: {sorted(leaked)}"


class ServerProcess:
    """An iserver subprocess started with a ready file, stopped at teardown."""

    def __init__(self, args: List[str], tmp: Path, python: Optional[str] = None,
                 env: Optional[dict] = None, timeout: float = 60.0) -> None:
        self.ready_file = tmp / f"ready-{time.monotonic_ns()}.json"
        self.log_path = tmp / (self.ready_file.stem + ".log")
        cmd = [python or sys.executable, "-m", "psana_ipc.server", "--port", "0",
               "--ready-file", str(self.ready_file)] + list(args)
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.ready = json.loads(self.ready_file.read_text())
        self.address = self.ready["address"]
        self.pid = self.proc.pid

    @property
    def workers(self) -> List[int]:
        return worker_pids(self.pid)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored signal {sig}:\n{self.log()}")
        self._log.close()
        return self.proc.returncode


def worker_pids(parent: int) -> List[int]:
    """Live children of a process, from /proc (no psutil on the server side)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def start_server(tmp_path):
    """Start servers with `start_server(args, python=..., env=...)`; each must
    exit 0 on SIGTERM at teardown unless the test already stopped it."""
    started = []

    def start(args: List[str] = (), **kw) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            code = server.stop()
            assert code == 0, f"server exited {code} on SIGTERM:\n{server.log()}"


@pytest.fixture
def server(start_server):
    """A synthetic-source server with two workers."""
    return start_server(["--workers", "2"])
