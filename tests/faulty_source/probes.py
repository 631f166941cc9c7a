"""Looking at a running server from outside, the way an operator would: raw
sockets speaking the protocol by hand, /proc for memory and descriptors, and
runs inside a private /dev/shm whose use `df` can measure."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest

from psana_ipc.client.wire import recv_message, socket_family
from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.protocol.messages import Hello


def connect(address: str, source: Optional[str] = None, timeout: float = 10.0) -> socket.socket:
    """A plain socket to the server, optionally from a chosen local address."""
    target = parse_address(address)
    sock = socket.socket(socket_family(target), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source is not None:
        sock.bind((source, 0))
    sock.connect(target)
    return sock


def send_hello(sock: socket.socket, token: Optional[str] = None, transport: str = "shm",
               window: int = 0) -> None:
    """Send a v1 hello; its reply is left to read."""
    hello = Hello(PROTOCOL_VERSION, token, socket.gethostname(), transport, window)
    sock.sendall(encode_frame(hello.to_header(0)))


def hello(sock: socket.socket, token: Optional[str] = None, transport: str = "shm",
          window: int = 0) -> Dict:
    """Send a v1 hello and return the server's reply header."""
    send_hello(sock, token, transport, window)
    return recv_message(sock)[0]


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed its end (what it sent before is skipped)."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll until `condition()` is true; fail naming `what` if it never is."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def status_kb(pid: int, field: str) -> int:
    """A size from /proc/<pid>/status (VmRSS, VmHWM, ...) in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def shm_used() -> int:
    """Bytes /dev/shm holds, as `df` counts them (what the node pays)."""
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def run_in_private_shm(module: str, size: str, *args: str) -> Dict[str, Any]:
    """Run `python -m <module> args` (tests/ importable) in a mount namespace
    whose /dev/shm is a fresh tmpfs of `size`, so the machine's /dev/shm is
    never touched; returns the JSON the module prints last. The namespace has
    its own pids too: whatever the module leaves running dies with it."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    script = (f"mount -t tmpfs -o size={size} psana-ipc-test /dev/shm && "
              f"exec {sys.executable} -m {module} \"$@\"")
    proc = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                           "--kill-child", "sh", "-c", script, "sh", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "mount" in proc.stderr and "ermission" in proc.stderr:
        pytest.skip(f"no mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class _Figures:
    """Lines printed at the end of the pytest session: the numbers a test
    run measured (connections held, cases fuzzed), for the record."""

    def __init__(self) -> None:
        self.lines = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_sep("-", "psana-ipc figures")
        for line in self.lines:
            terminalreporter.write_line(line)


def record_figure(config, line: str) -> None:
    """Add a line to the session's summary (`config` is pytest's)."""
    figures = config.pluginmanager.get_plugin("psana-ipc-figures")
    if figures is None:
        figures = _Figures()
        config.pluginmanager.register(figures, "psana-ipc-figures")
    figures.lines.append(line)
