"""Blocking send and receive of v1 frames on a socket, and the family of a
socket for an address (the protocol package itself never touches sockets).

Frames are read with the protocol's own `FrameDecoder` by a `Receiver`, one
per connection. The header comes first, so the caller can choose where the
payload goes before it arrives: it is received with `recv_into` straight
into the memory it is kept in, a batch's row or the array handed out, all
but what arrived in the chunk its header came in. A client's receiver reads
in chunks: one `recv` brings every reply the server has sent meanwhile
(their headers are small), where reading each header exactly takes two.
"""
import socket
from typing import Any, Dict, Optional, Tuple

from psana_ipc.protocol.address import Address, address_family
from psana_ipc.protocol.framing import FrameDecoder, Head, encode_frame

MAX_PAYLOAD = 1 << 40
RECV_CHUNK = 65536


class ConnectionClosed(ConnectionError):
    """The server closed the connection before a whole frame arrived."""


def socket_family(address: Address) -> int:
    """The family of a socket that connects to `address`."""
    return getattr(socket, address_family(address))


def send_message(sock: socket.socket, header: Dict[str, Any]) -> None:
    sock.sendall(encode_frame(header))


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed("the server closed the connection")
        got += n


class Receiver:
    """The frames arriving on one socket. `chunk`: read up to that many bytes
    at once; 0 reads exactly what the next header needs, leaving the next
    frame in the socket (for code that hands the socket on)."""

    def __init__(self, sock: socket.socket, chunk: int = RECV_CHUNK) -> None:
        self.sock = sock
        self.chunk = chunk
        self.decoder = FrameDecoder(max_payload=MAX_PAYLOAD)

    def buffered(self) -> bool:
        """Whether bytes of a frame are read already: its rest is on its way."""
        return self.decoder.buffered > 0

    def head(self) -> Head:
        """The next frame's header and payload size; its payload, if any, is
        still to be read with `payload`."""
        head = self.decoder.next_header()
        while head is None:
            missing = self.decoder.missing
            data = self.sock.recv(max(missing, self.chunk))
            if not data:
                raise ConnectionClosed("the server closed the connection")
            self.decoder.receive_data(data)
            head = self.decoder.next_header()
        if not head.size:
            self.decoder.next_frame()       # the whole frame: the decoder moves past it
        return head

    def payload(self, into: memoryview) -> None:
        """The payload of the header `head` gave, into `into` (its size)."""
        recv_into_exact(self.sock, into[self.decoder.take_payload(into):])


def recv_message(sock: socket.socket) -> Tuple[Dict[str, Any], Optional[bytearray]]:
    """One frame, read exactly: its header and, if it says `nbytes`, its payload."""
    receiver = Receiver(sock, chunk=0)
    head = receiver.head()
    if not head.size:
        return head.header, None
    payload = bytearray(head.size)
    receiver.payload(memoryview(payload))
    return head.header, payload
