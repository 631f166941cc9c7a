"""Blocking send and receive of v1 frames on a socket, and the family of a
socket for an address (the protocol package itself never touches sockets).

Frames are read with the protocol's own `FrameDecoder`, fed exactly the
bytes it is missing, so nothing of the next frame is read early; a payload
is received with `recv_into` straight into the memory it is kept in.
"""
import socket
from typing import Any, Dict, Optional, Tuple

from psana_ipc.protocol.address import Address, address_family
from psana_ipc.protocol.framing import FrameDecoder, encode_frame

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
    decoder = FrameDecoder(max_payload=MAX_PAYLOAD)
    head = decoder.next_header()
    while head is None:
        decoder.receive_data(recv_exact(sock, decoder.missing))
        head = decoder.next_header()
    if not head.size:
        return head.header, None
    payload = bytearray(head.size)
    view = memoryview(payload)
    recv_into_exact(sock, view[decoder.take_payload(view):])
    return head.header, payload
