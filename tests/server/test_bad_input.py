"""Hostile and broken input: every case gets an error reply (or a closed
connection where no reply can be framed) and the server serves on."""
import json
import socket
import struct

import numpy as np
import pytest

from psana_ipc.client import Client
from psana_ipc.client.wire import recv_message
from psana_ipc.protocol import PROTOCOL_VERSION, errors
from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.protocol.messages import Hello
from psana_ipc.server.sources.synthetic import expected


def _raw(server):
    sock = socket.create_connection(parse_address(server.address), timeout=10)
    return sock


def _hello(sock):
    sock.sendall(encode_frame(Hello(PROTOCOL_VERSION, host=socket.gethostname()).to_header(0)))
    header, _ = recv_message(sock)
    assert header["ok"]


def _still_serving(server):
    with Client(server.address) as c:
        assert np.array_equal(c.get("x", 1, "epix100", 2, "raw"), expected("epix100", "raw", 2))


def _closed(sock):
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("payload, code", [
    (struct.pack(">I", 10**6), errors.HEADER_TOO_LARGE),
    (struct.pack(">I", 5) + b"{bad}", errors.BAD_JSON),
    (struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc", errors.BAD_JSON),
    (struct.pack(">I", 6) + b"[1, 2]", errors.BAD_JSON),
    (struct.pack(">I", 0), errors.BAD_FRAME),
])
def test_broken_framing_gets_an_error_then_a_close(shared_server, payload, code):
    with _raw(shared_server) as sock:
        sock.sendall(payload)
        header, _ = recv_message(sock)
        assert header["ok"] is False and header["code"] == code
        assert _closed(sock)
    _still_serving(shared_server)


@pytest.mark.parametrize("request_, code", [
    ({"op": "get", "id": 1, "exp": "x", "run": "one", "detector": "epix100", "events": [1]},
     errors.BAD_REQUEST),
    ({"op": "get", "id": 2, "exp": "x", "run": 1, "detector": "epix100", "events": "all"},
     errors.BAD_REQUEST),
    ({"op": "teleport", "id": 3}, errors.UNKNOWN_OP),
    ({"op": "get", "id": 4, "exp": "x", "run": 1, "detector": "epix100", "events": [1],
      "mode": "best"}, errors.UNKNOWN_MODE),
    ({"op": "get", "id": 5, "exp": "x", "run": 1, "detector": "nope", "events": [1]},
     errors.UNKNOWN_DETECTOR),
    ({"op": "get", "id": 6, "exp": "x", "run": 1, "detector": "epix100", "events": [10**6]},
     errors.OUT_OF_RANGE),
    ({"op": "hello", "id": 7, "version": 99}, errors.VERSION),
])
def test_wrong_requests_get_error_replies_on_a_live_connection(shared_server, request_, code):
    with _raw(shared_server) as sock:
        _hello(sock)
        sock.sendall(encode_frame(request_))
        header, _ = recv_message(sock)
        assert header["ok"] is False and header["code"] == code and header["id"] == request_["id"]
        sock.sendall(encode_frame({"op": "ping", "id": 99}))
        assert recv_message(sock)[0] == {"ok": True, "id": 99, "pong": True}
    _still_serving(shared_server)


def test_requests_before_hello_are_refused(shared_server):
    with _raw(shared_server) as sock:
        sock.sendall(encode_frame({"op": "ping", "id": 1}))
        header, _ = recv_message(sock)
        assert header["code"] == errors.NOT_READY


@pytest.mark.parametrize("body", [b"{not json at all", b"\x01\x02garbage", b'{"exp": 1}',
                                  b"[" * 3000, struct.pack(">I", 10**9) + b"{}"])
def test_broken_legacy_requests_get_a_json_error(shared_server, body):
    with _raw(shared_server) as sock:
        sock.sendall(body)
        reply = json.loads(sock.recv(4096).decode())
        assert reply["code"] in (errors.BAD_JSON, errors.BAD_REQUEST, errors.HEADER_TOO_LARGE)
    _still_serving(shared_server)


def test_oversized_legacy_request_is_refused(shared_server):
    with _raw(shared_server) as sock:
        sock.sendall(b'{"exp": "' + b"x" * 10000)
        reply = json.loads(sock.recv(4096).decode())
        assert reply["code"] == errors.HEADER_TOO_LARGE
    _still_serving(shared_server)


def test_silent_connections_are_dropped_and_others_served(start_server):
    server = start_server(["--workers", "1", "--idle-timeout", "0.5"])
    with _raw(server) as silent:
        _still_serving(server)
        assert _closed(silent)


def test_client_vanishing_mid_get_frees_its_slots(server):
    sock = _raw(server)
    _hello(sock)
    sock.sendall(encode_frame({"op": "get", "id": 1, "exp": "x", "run": 1,
                               "detector": "jungfrau4M", "events": list(range(50))}))
    recv_message(sock)
    sock.close()
    _still_serving(server)   # the leak fixture checks the slots were unlinked
