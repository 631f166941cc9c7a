"""The btx dialect from the client side, for servers that speak nothing else.

One connection per event: send the JSON request, read `{name, shape, dtype}`,
copy the segment, send `ACK`. Our server marks its replies (`is_ours`) and
unlinks the segment after the ACK or when the connection closes. An old btx
server unlinks only on an ACK, so a client killed before it sends one (a
DataLoader under `scancel`) would leave the segment in /dev/shm: against an
old server the client unlinks the name itself as soon as it has mapped it,
as the btx client does after copying, so no exit path leaves it behind.
"""
import json
import os
import socket
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.address import Address
from psana_ipc.protocol.errors import BAD_JSON, ServerError
from psana_ipc.protocol.legacy import ACK, PROBE_FIELD, is_ours
from psana_ipc.protocol.shm_names import segment_path

from .shm import attach
from .wire import socket_family

MAX_REPLY = 1 << 20
PROBE_TIMEOUT = 30.0


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


def _request(sock: socket.socket, exp: str, run: Any, access_mode: str, detector_name: str,
             event: int, mode: str, **extra: Any) -> Dict[str, Any]:
    sock.sendall(json.dumps(dict(exp=exp, run=run, access_mode=access_mode,
                                 detector_name=detector_name, event=int(event), mode=mode,
                                 **extra)).encode("utf-8"))
    reply = _recv_json(sock)
    if not isinstance(reply, dict):
        raise ServerError(BAD_JSON, f"the legacy server answered {reply!r}")
    return reply


def fetch_reply(address: Address, exp: str, run: Any, access_mode: str, detector_name: str,
                event: int, mode: str = "calib",
                timeout: Optional[float] = 300.0) -> Tuple[np.ndarray, Dict[str, Any]]:
    """One frame through the legacy dialect, as a private array, with the reply
    that described it. An error reply raises ServerError (its `.reply` says
    whether our server sent it)."""
    with socket.socket(socket_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        reply = _request(sock, exp, run, access_mode, detector_name, event, mode)
        if "error" in reply or "name" not in reply:
            raise ServerError(reply.get("code", "internal"),
                              reply.get("message", str(reply.get("error", reply))), reply)
        segment = attach(reply["name"])
        try:
            if not is_ours(reply):
                _unlink(reply["name"])
            view = np.ndarray(tuple(reply["shape"]), dtype=np.dtype(reply["dtype"]), buffer=segment)
            result = np.array(view)
            del view
        finally:
            segment.close()
        sock.sendall(ACK)
        return result, reply


def fetch(address: Address, exp: str, run: Any, access_mode: str, detector_name: str,
          event: int, mode: str = "calib", timeout: Optional[float] = 300.0) -> np.ndarray:
    """One frame through the legacy dialect, as a private array."""
    return fetch_reply(address, exp, run, access_mode, detector_name, event, mode, timeout)[0]


def _unlink(name: str) -> None:
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        pass


def probe(address: Address, request: Sequence[Any], mode: str, timeout: Optional[float]) -> str:
    """"v1" if the server is ours, "legacy" if it is an old btx server.

    Asks for the first frame a dataset wants in the legacy dialect, flagged
    as a probe: our server answers at once with its mark and reads nothing,
    an old one ignores the flag and serves the frame (a v1 hello would make
    it log an error). The mark decides, however long the server took. No
    answer within `timeout` gives "legacy" for now: our
    server answers that dialect too, marked, so the guess is corrected on
    the first fetch. Failing to connect raises OSError.
    """
    exp, run, access_mode, detector_name, event = request
    with socket.socket(socket_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        try:
            reply = _request(sock, exp, run, access_mode, detector_name, event, mode,
                             **{PROBE_FIELD: True})
        except (socket.timeout, ConnectionError, ServerError):
            return "legacy"
        if not is_ours(reply) and "name" in reply:
            _unlink(reply["name"])
        try:
            sock.sendall(ACK)
        except OSError:
            pass
        return "v1" if is_ours(reply) else "legacy"

