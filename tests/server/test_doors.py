"""Doors that never close: every pre-request buffer is small in both
dialects, a connection without a complete request (or hello) is closed after
a short deadline and one idle past --idle-timeout holding nothing too, and a
worker out of descriptors closes the oldest such connections to let new
clients in. Real sockets against a real server."""
import resource
import socket
import time

import numpy as np

from psana_ipc.client import Client
from psana_ipc.client.wire import recv_message
from psana_ipc.protocol import errors
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.protocol.messages import Get, Hello, Info, Ping, RunKey
from psana_ipc.server.sources.synthetic import expected

from faulty_source import SLOW_RUNS, server_env
from faulty_source.probes import (closed_by_server, connect, hello, open_fds, record_figure,
                                  send_hello)


def _served(client, event=1):
    return np.array_equal(client.get("x", 1, "epix100", event, "raw"),
                          expected("epix100", "raw", event))


def test_a_legacy_whitespace_flood_is_cut_off(server):
    sock = connect(server.address)
    try:
        for _ in range(64):
            sock.sendall(b" " * 4096)
    except (BrokenPipeError, ConnectionResetError):
        pass                               # closed already: what the test wants
    assert closed_by_server(sock)
    assert b"header_too_large" in _received_before_close(server, b" " * 8192)
    with Client(server.address) as c:
        assert _served(c)


def _received_before_close(server, flood: bytes) -> bytes:
    sock = connect(server.address)
    sock.sendall(flood)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_a_v1_prefix_before_hello_is_capped(server):
    sock = connect(server.address)
    sock.sendall(b"\x00\x00\xff\x00" + b" " * 8192)      # a 65280-byte header, never sent
    header, _ = recv_message(sock)
    assert header["code"] == errors.HEADER_TOO_LARGE
    assert closed_by_server(sock)


def test_connections_without_a_complete_request_are_closed(start_server):
    """--idle-timeout 1: one byte of v1, a legacy request cut short, a hello sent
    one byte at a time, and a request begun after hello are all closed, while
    a client that sent its requests is served."""
    server = start_server(["--workers", "1", "--idle-timeout", "1"])
    one_byte = connect(server.address)
    one_byte.sendall(b"\x00")
    half_legacy = connect(server.address)
    half_legacy.sendall(b'{"exp": "x", ')
    trickle = connect(server.address)
    hello_bytes = encode_frame(Hello(1, host="h").to_header(0))
    begun = connect(server.address)
    assert hello(begun)["ok"]
    begun.sendall(encode_frame(Ping().to_header(1))[:3])
    closed = False
    for b in hello_bytes[:-1]:             # 1 byte per 0.2 s: never complete in time
        try:
            trickle.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.2)
    for sock in (one_byte, half_legacy, begun):
        sock.settimeout(15)
        assert closed_by_server(sock)
    trickle.settimeout(15)
    assert closed or closed_by_server(trickle)
    with Client(server.address) as c:
        assert _served(c)


def test_an_idle_connection_holding_nothing_is_closed_and_the_client_reconnects(start_server):
    server = start_server(["--workers", "1", "--idle-timeout", "1"])
    holding = connect(server.address)
    assert hello(holding)["ok"]
    holding.sendall(encode_frame(Get(RunKey("x", 1, "epix100"), "raw", (1,)).to_header(1)))
    assert recv_message(holding)[0]["ok"]  # a frame it never releases
    idle = connect(server.address)
    assert hello(idle)["ok"]
    idle.settimeout(15)
    assert closed_by_server(idle)
    holding.settimeout(1.5)
    assert not closed_by_server(holding)   # it holds a slot: kept however long
    with Client(server.address) as c:
        assert _served(c, 1)
        sock = c._sock
        sock.settimeout(15)
        assert sock.recv(1, socket.MSG_PEEK) == b""      # the server closed it
        assert _served(c, 2)                              # and the client reconnected
    holding.close()


def test_out_of_descriptors_the_oldest_silent_connections_make_room(start_server, pytestconfig):
    """The worker may open 40 more descriptors; 60 connections that sent one
    byte each would lock every new client out. The oldest are closed instead,
    and a client arriving after them is served."""
    server = start_server(["--workers", "1"])
    worker = server.workers[0]
    _, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (open_fds(worker) + 40, hard))
    attackers = []
    for _ in range(60):
        sock = connect(server.address)
        sock.sendall(b"\x00")
        attackers.append(sock)
    with Client(server.address, timeout=30) as c:
        assert _served(c)
    for sock in attackers:
        sock.settimeout(0.5)
    closed = sum(closed_by_server(sock) for sock in attackers)
    assert closed > 0
    assert "out of file descriptors" in server.log()
    record_figure(pytestconfig, f"descriptor attack: 60 one-byte connections against a worker "
                                f"with 40 descriptors free: {closed} closed to make room, the "
                                f"next client served")
    for sock in attackers:
        sock.close()


def test_a_hello_accepted_just_before_a_long_answer_is_read_before_its_deadline_is_judged(
        start_server):
    """A long answer given as a request is read (psana opening a run for an
    `info`) must not close a connection the same pass accepted, whose hello
    waited in its socket meanwhile: deadlines are judged at the time the loop
    last looked at the sockets."""
    server = start_server(["--source", "faulty", "--workers", "1", "--idle-timeout", "1"],
                          env=server_env())
    with Client(server.address) as slow:
        assert slow.ping()
        slow.send(Info("x", SLOW_RUNS, "epix100"))     # the only worker opens a run for 2 s
        time.sleep(0.3)
        late = connect(server.address)                 # the listener ready first ...
        send_hello(late)
        second = slow.send(Info("x", SLOW_RUNS + 1, "epix100"))   # ... this next: one pass
        try:
            assert recv_message(late)[0]["ok"]
        finally:
            late.close()
        assert slow.reply(second)[0].info["events"] > 0


def test_a_hello_sent_while_the_worker_was_busy_is_read_before_its_deadline_is_judged(
        start_server):
    """A unit of work longer than the hello's deadline (psana setting calib up
    on a loaded node) must not close a connection accepted just before it
    whose hello arrived in time and waited in its socket: the loop reads what
    came before judging deadlines."""
    server = start_server(["--workers", "1", "--idle-timeout", "1", "--cost-kind", "wait",
                           "--cost-ms", "2500"])
    with Client(server.address) as busy:
        assert busy.ping()
        late = connect(server.address)              # accepted with the request below
        rid = busy.submit("x", 1, "epix100", [1], mode="raw")     # 2.5 s of the only worker
        time.sleep(0.3)
        try:
            assert hello(late)["ok"]                # sent 0.3 s after connecting, in time
        finally:
            late.close()
        frames = list(busy.frames(rid))
        assert len(frames) == 1
        frames[0].release()
