"""Fixtures that run the old btx server (tests/btx/iserver.py) as a real
process; test modules import the ones they use."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .loops import send_done_per_worker

TESTS = Path(__file__).resolve().parents[1]


class BtxServer:
    def __init__(self, tmp_path: Path, workers: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = ("127.0.0.1", s.getsockname()[1])
        self.workers = workers
        self.log_path = tmp_path / f"btx-{self.address[1]}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "btx.iserver", str(self.address[1]),
                                      str(workers)], cwd=TESTS, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "Server started" not in self.log():   # printed once it listens
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                f"btx server did not start:\n{self.log()}"
            time.sleep(0.02)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                send_done_per_worker(self.address, self.workers)
            except OSError:
                pass
        try:
            self.proc.wait(20)
        finally:
            self.proc.kill()
            self.proc.wait()
            self._log.close()


@pytest.fixture
def start_btx_server(tmp_path):
    """`start_btx_server(workers)`: old btx servers, stopped at teardown."""
    started = []

    def start(workers: int = 2) -> BtxServer:
        server = BtxServer(tmp_path, workers)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def btx_server(start_btx_server):
    """The address of an old btx server with two workers."""
    return start_btx_server(2).address
