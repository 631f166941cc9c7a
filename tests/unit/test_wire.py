"""The client's receiver over a real socket pair: replies read in chunks
come out whole and in order, payloads land in the caller's memory whatever
part of them came in a header's chunk, and the exact reader leaves the
next frame in the socket."""
import socket
import threading

from hypothesis import given, settings, strategies as st

from psana_ipc.client.wire import Receiver, recv_message
from psana_ipc.protocol.framing import encode_frame


def _send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    return sender


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=6),
       chunk=st.sampled_from([1, 7, 4096, 65536]))
def test_chunked_reads_give_every_frame_whole_and_in_order(sizes, chunk):
    payloads = [bytes([k % 251]) * n for k, n in enumerate(sizes)]
    stream = b"".join(encode_frame({"id": k, "nbytes": len(p)}) + p
                      for k, p in enumerate(payloads))
    a, b = socket.socketpair()
    with a, b:
        sender = _send_in_thread(a, stream)
        receiver = Receiver(b, chunk)
        for k, payload in enumerate(payloads):
            head = receiver.head()
            assert head.header["id"] == k and head.size == len(payload)
            if head.size:
                into = bytearray(head.size)
                receiver.payload(memoryview(into))
                assert into == payload
        sender.join()
        assert not receiver.buffered()


def test_a_reader_knows_when_more_replies_are_already_read():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame({"id": 1}) + encode_frame({"id": 2}))
        receiver = Receiver(b)
        assert receiver.head().header == {"id": 1}
        assert receiver.buffered()          # the second came in the same read
        assert receiver.head().header == {"id": 2}
        assert not receiver.buffered()


def test_the_exact_reader_leaves_the_next_frame_in_the_socket():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame({"id": 1, "nbytes": 3}) + b"abc" + encode_frame({"id": 2}))
        assert recv_message(b) == ({"id": 1, "nbytes": 3}, bytearray(b"abc"))
        assert recv_message(b) == ({"id": 2}, None)
