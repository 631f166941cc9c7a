"""Blocking send and receive of v1 frames on a socket, using the protocol's
framing rules, and the family of a socket for an address (the protocol
package itself never touches sockets)."""
import socket
from typing import Any, Dict, Optional, Tuple

from psana_ipc.protocol.address import Address, address_family
from psana_ipc.protocol.errors import BAD_FRAME, ProtocolError
from psana_ipc.protocol.framing import LENGTH, decode_header, encode_frame, header_length, payload_size

MAX_PAYLOAD = 1 << 40


class ConnectionClosed(ConnectionError):
    """The server closed the connection before a whole frame arrived."""


def socket_family(address: Address) -> int:
    """The family of a socket that connects to `address`."""
    return getattr(socket, address_family(address))


def send_message(sock: socket.socket, header: Dict[str, Any]) -> None:
    sock.sendall(encode_frame(header))


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed("the server closed the connection")
        got += n


def recv_message(sock: socket.socket) -> Tuple[Dict[str, Any], Optional[bytearray]]:
    """One frame: its header and, if it says `nbytes`, its payload."""
    n = header_length(bytes(recv_exact(sock, LENGTH.size)))
    header = decode_header(bytes(recv_exact(sock, n)))
    try:
        size = payload_size(header, MAX_PAYLOAD)
    except ProtocolError as e:
        raise ProtocolError(BAD_FRAME, f"bad reply from server: {e.message}") from e
    return header, (recv_exact(sock, size) if size else None)
