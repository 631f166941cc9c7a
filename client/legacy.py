"""The btx dialect from the client side, for servers that speak nothing else.

One connection per event: send the JSON request, read `{name, shape, dtype}`,
copy the segment, send `ACK`. The server unlinks the segment after the ACK;
we only attach and close (old servers tolerate either).
"""
import json
import socket
from typing import Any, Optional

import numpy as np

from psana_ipc.protocol.address import Address
from psana_ipc.protocol.errors import BAD_JSON, ProtocolError, ServerError
from psana_ipc.protocol.legacy import ACK, DONE

from .connection import Client
from .shm import attach
from .wire import ConnectionClosed, socket_family

MAX_REPLY = 1 << 20
DETECT_TIMEOUT = 1.0


def _recv_json(sock: socket.socket) -> Any:
    """Read until the bytes parse as JSON: the dialect has no framing."""
    buf = b""
    while len(buf) < MAX_REPLY:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        try:
            return json.loads(buf.decode("utf-8"))
        except ValueError:
            continue
    raise ServerError(BAD_JSON, f"no JSON reply from the legacy server (got {buf[:80]!r})")


def fetch(address: Address, exp: str, run: Any, access_mode: str, detector_name: str,
          event: int, mode: str = "calib", timeout: Optional[float] = 300.0) -> np.ndarray:
    """One frame through the legacy dialect, as a private array."""
    with socket.socket(socket_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(json.dumps({"exp": exp, "run": run, "access_mode": access_mode,
                                 "detector_name": detector_name, "event": int(event),
                                 "mode": mode}).encode("utf-8"))
        reply = _recv_json(sock)
        if "name" not in reply:
            raise ServerError(reply.get("code", "internal"), reply.get("message", str(reply)),
                              reply)
        segment = attach(reply["name"])
        try:
            view = np.ndarray(tuple(reply["shape"]), dtype=np.dtype(reply["dtype"]), buffer=segment)
            result = np.array(view)
            del view
        finally:
            segment.close()
        sock.sendall(ACK)
        return result


def send_done(address: Address, timeout: float = 10.0) -> None:
    """The old shutdown word; our server stops entirely on it."""
    with socket.socket(socket_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(DONE)


def detect_protocol(address: Any, timeout: float = DETECT_TIMEOUT) -> str:
    """"v1" if the server answers a v1 hello, else "legacy" (an old btx server
    reads the hello as bad JSON and never answers)."""
    probe = Client(address, timeout=timeout)
    try:
        probe.ping()
        return "v1"
    except (socket.timeout, ConnectionResetError, ConnectionClosed, ProtocolError):
        return "legacy"
    finally:
        probe.close()
