"""Blocking send and receive of v1 frames on a socket, and the family of a
socket for an address (the protocol package itself never touches sockets).

Frames are read with the protocol's own `FrameDecoder`, fed exactly the
bytes it is missing, so nothing of the next frame is read early. The header
comes first (`recv_head`), so the caller can choose where the payload goes
before it arrives (`recv_payload`): it is received with `recv_into`
straight into the memory it is kept in, a batch's row or the array handed
out, never through a buffer of its own.
"""
import socket
from typing import Any, Dict, Optional, Tuple

from psana_ipc.protocol.address import Address, address_family
from psana_ipc.protocol.framing import FrameDecoder, Head, encode_frame

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


def recv_head(sock: socket.socket) -> Tuple[FrameDecoder, Head]:
    """The next frame's header and payload size; its payload, if any, is
    still to be read with `recv_payload` (with the decoder returned)."""
    decoder = FrameDecoder(max_payload=MAX_PAYLOAD)
    head = decoder.next_header()
    while head is None:
        decoder.receive_data(recv_exact(sock, decoder.missing))
        head = decoder.next_header()
    return decoder, head


def recv_payload(sock: socket.socket, decoder: FrameDecoder, into: memoryview) -> None:
    """The payload of the header `recv_head` gave, into `into` (its size)."""
    recv_into_exact(sock, into[decoder.take_payload(into):])


def recv_message(sock: socket.socket) -> Tuple[Dict[str, Any], Optional[bytearray]]:
    """One frame: its header and, if it says `nbytes`, its payload."""
    decoder, head = recv_head(sock)
    if not head.size:
        return head.header, None
    payload = bytearray(head.size)
    recv_payload(sock, decoder, memoryview(payload))
    return head.header, payload
