"""Stopping a server, ours or an old btx one, within the time given.

Ours stops entirely on one v1 `shutdown` (or on one `DONE`). An old btx
server stops one worker per `DONE` and never answers a v1 request, so after
`min(timeout, V1_WAIT)` without an answer the stopper sends `DONE` once per
connection until connections are refused: that is every worker, and then
the main process, gone. Every step is bounded by `timeout` and the whole by
`wait`; what still listens at the end is reported with its process ids (the
ones of this user, found in /proc), never called stopped.
"""
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

from psana_ipc.protocol.address import Address, format_address
from psana_ipc.protocol.errors import ProtocolError, ServerError
from psana_ipc.protocol.legacy import Done, LegacyError, is_ours

from .client import Client
from .legacy import recv_reply
from .wire import ConnectionClosed, socket_family

V1_WAIT = 2.0          # an answer to `shutdown` takes longer only from a worker stuck in psana
MAX_DONE = 256         # more workers than any btx server runs
REFUSED = (ConnectionRefusedError, FileNotFoundError)


@dataclass
class StopReport:
    address: Address
    stopped: bool
    dialect: str                  # "v1": one shutdown request; "legacy": DONE per worker
    done_sent: int = 0
    still_running: List[int] = field(default_factory=list)

    def __str__(self) -> str:
        where = format_address(self.address)
        how = "shutdown request" if self.dialect == "v1" else f"{self.done_sent} DONE"
        if self.stopped:
            return f"stopped the server at {where} ({how})"
        pids = (f"; processes still listening: {' '.join(map(str, self.still_running))}"
                if self.still_running else "")
        return f"server at {where} still accepts connections after {how}{pids}"


def stop_server(address: Address, legacy: bool = False, timeout: float = 60.0,
                wait: float = 30.0, token: Optional[str] = None) -> StopReport:
    """Stop the server at `address`; connection refused at the start raises OSError."""
    if not legacy and _shutdown_v1(address, min(timeout, V1_WAIT), token):
        deadline = time.monotonic() + wait
        stopped = _refused_by(address, deadline, timeout)
        return _report(address, stopped, "v1", 0)
    deadline = time.monotonic() + wait
    sent = 0
    while sent < MAX_DONE and time.monotonic() < deadline:
        step = max(0.05, min(timeout, deadline - time.monotonic()))
        try:
            sock = socket.socket(socket_family(address), socket.SOCK_STREAM)
            sock.settimeout(step)
            with sock:
                sock.connect(address)
                sock.sendall(Done().to_bytes())
                sent += 1
                if _until_closed(sock):
                    break
        except REFUSED:
            return _report(address, True, "legacy", sent)
        except OSError:
            time.sleep(0.05)   # a timeout or a reset: the server is busy stopping
    return _report(address, _refused_by(address, deadline, timeout), "legacy", sent)


def _shutdown_v1(address: Address, timeout: float, token: Optional[str]) -> bool:
    """True once our server accepted the shutdown; False if nothing answered
    in v1 (an old server). Refused connections and error replies raise."""
    client = Client(address, token=token, timeout=timeout, connect_timeout=timeout)
    try:
        client.shutdown()
        return True
    except (socket.timeout, ConnectionClosed, ConnectionResetError, ProtocolError):
        return False
    finally:
        client.close()


def _until_closed(sock: socket.socket) -> bool:
    """Read until the server closes the DONE connection: True when it was ours,
    which stops entirely on one DONE (it answers with its mark); its marked
    error reply (refusing DONE, e.g. without the token) is raised."""
    try:
        reply = recv_reply(sock, until_closed=True)
    except ProtocolError:
        return False
    if isinstance(reply, LegacyError) and is_ours(reply):
        raise ServerError.from_reply(reply)
    return is_ours(reply)


def _refused_by(address: Address, deadline: float, timeout: float) -> bool:
    """Whether connections are refused, trying until `deadline`."""
    while True:
        try:
            with socket.socket(socket_family(address), socket.SOCK_STREAM) as sock:
                sock.settimeout(max(0.05, min(timeout, deadline - time.monotonic())))
                sock.connect(address)
        except REFUSED:
            return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _report(address: Address, stopped: bool, dialect: str, sent: int) -> StopReport:
    return StopReport(address, stopped, dialect, sent, [] if stopped else listeners(address))


def listeners(address: Address) -> List[int]:
    """Ids of this user's processes holding the listening socket at `address`."""
    inodes = _listening_inodes(address)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {p.readlink().name for p in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            pids.append(int(proc.name))
    return sorted(pids)


def _listening_inodes(address: Address) -> Set[str]:
    if isinstance(address, str):
        rows = _table("/proc/net/unix")
        return {r[6] for r in rows if len(r) > 7 and r[7] == address}
    port = f"{address[1]:04X}"
    rows = _table("/proc/net/tcp") + _table("/proc/net/tcp6")
    return {r[9] for r in rows if r[1].rsplit(":", 1)[1] == port and r[3] == "0A"}


def _table(path: str) -> List[List[str]]:
    try:
        return [line.split() for line in Path(path).read_text().splitlines()[1:]]
    except OSError:
        return []
