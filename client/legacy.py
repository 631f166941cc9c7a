"""The btx dialect from the client side, for servers that speak nothing else.

One connection per event: send the JSON request, read `{name, shape, dtype}`,
copy the segment, send `ACK`; the messages are the protocol's legacy types
(`protocol.legacy`). Our server marks its replies (`is_ours`) and
unlinks the segment after the ACK or when the connection closes. An old btx
server unlinks only on an ACK, so a client killed before it sends one (a
DataLoader under `scancel`) would leave the segment in /dev/shm: against an
old server the client unlinks the name itself as soon as it has mapped it,
as the btx client does after copying, so no exit path leaves it behind.
"""
import os
import socket
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.address import Address
from psana_ipc.protocol.errors import BAD_JSON, INTERNAL, ProtocolError, ServerError
from psana_ipc.protocol.legacy import (ACK, LegacyError, LegacyFrame, LegacyGet, LegacyReply,
                                       Probe, is_ours, parse_legacy_reply)
from psana_ipc.protocol.shm_names import segment_path

from .shm import attach
from .wire import ConnectionClosed, socket_family

MAX_REPLY = 1 << 20
PROBE_TIMEOUT = 30.0


def recv_reply(sock: socket.socket, until_closed: bool = False) -> Optional[LegacyReply]:
    """A reply, read until its bytes parse (the dialect has no framing) or,
    `until_closed`, until the server closes (None if nothing parses then).
    ConnectionClosed when the server closes before a whole reply came;
    ProtocolError when what came is no reply."""
    buf = b""
    while len(buf) < MAX_REPLY:
        chunk = sock.recv(4096)
        if not chunk:
            if until_closed:
                return parse_legacy_reply(buf)
            raise ConnectionClosed(f"lost the connection to the legacy server before its reply "
                                   f"was complete ({len(buf)} bytes came)")
        buf += chunk
        reply = None if until_closed else parse_legacy_reply(buf)
        if reply is not None:
            return reply
    raise ProtocolError(BAD_JSON, f"no JSON reply from the legacy server in {MAX_REPLY} bytes "
                                  f"(got {buf[:80]!r}...)")


def _request(sock: socket.socket, request: Any) -> LegacyReply:
    sock.sendall(request.to_bytes())
    try:
        return recv_reply(sock)
    except ProtocolError as e:
        raise ServerError(e.code, e.message) from None


def _legacy_get(exp: str, run: Any, access_mode: str, detector_name: str, event: int,
                mode: str) -> LegacyGet:
    """The request, refused here as the server would refuse it."""
    try:
        return LegacyGet(exp, run, detector_name, int(event), access_mode, mode)
    except ProtocolError as e:
        raise ServerError(e.code, e.message) from None


def fetch_reply(address: Address, exp: str, run: Any, access_mode: str, detector_name: str,
                event: int, mode: str = "calib",
                timeout: Optional[float] = 300.0) -> Tuple[np.ndarray, LegacyFrame]:
    """One frame through the legacy dialect, as a private array, with the reply
    that described it. An error reply raises ServerError (`is_ours` of its
    `.reply` says whether our server sent it)."""
    request = _legacy_get(exp, run, access_mode, detector_name, event, mode)
    with socket.socket(socket_family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        reply = _request(sock, request)
        if isinstance(reply, LegacyError):
            raise ServerError.from_reply(reply)
        if not isinstance(reply, LegacyFrame):
            raise ServerError(INTERNAL, f"the server answered {reply} to a request for a frame",
                              reply)
        segment = attach(reply.name)
        try:
            if not reply.marked:
                _unlink(reply.name)
            view = np.ndarray(reply.shape, dtype=np.dtype(reply.dtype), buffer=segment)
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
            reply = _request(sock, Probe(_legacy_get(exp, run, access_mode, detector_name,
                                                     event, mode)))
        except (socket.timeout, ConnectionError, ServerError):
            return "legacy"
        if isinstance(reply, LegacyFrame) and not reply.marked:
            _unlink(reply.name)
        try:
            sock.sendall(ACK)
        except OSError:
            pass
        return "v1" if is_ours(reply) else "legacy"

