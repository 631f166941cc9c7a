"""Fixtures shared by every test: real servers on loopback and a guard that
fails any test leaving shared memory behind."""
import signal
import time
from pathlib import Path
from typing import List, Optional

import pytest

from psana_ipc.client import server_process

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


class ServerProcess(server_process.ServerProcess):
    """An iserver subprocess with its ready file and log in `tmp`; `stop` fails a
    test whose server ignores the signal."""

    def __init__(self, args: List[str], tmp: Path, python: Optional[str] = None,
                 env: Optional[dict] = None, timeout: float = 60.0) -> None:
        ready_file = tmp / f"ready-{time.monotonic_ns()}.json"
        super().__init__(args, python=python, ready_file=ready_file, env=env,
                         log_file=ready_file.with_suffix(".log"), timeout=timeout)

    @property
    def workers(self) -> List[int]:
        return worker_pids(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        try:
            return super().stop(sig, timeout)
        except TimeoutError as e:
            raise AssertionError(str(e)) from None


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
