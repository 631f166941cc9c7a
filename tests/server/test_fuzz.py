"""Hostile input thrown at running servers: random bytes, broken and
truncated frames, absurd lengths, ill-typed and deeply nested JSON, in
both dialects. After every case the server has answered or closed (never
hung), a fresh connection gets `pong`, no worker died and nothing was
logged as an unexpected error.

Two servers live for the whole module: an open one (both dialects, so
requests really run; cases never send DONE or shutdown) and one with a
token (hello and shutdown fuzzed against a secret they do not know).
"""
import json
import socket
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from psana_ipc.client import Client
from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.protocol.messages import MODES, Hello

from conftest import ServerProcess
from faulty_source.probes import closed_by_server, connect, record_figure

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
OPS = ["hello", "info", "get", "release", "ping", "stats", "shutdown"]
PLAUSIBLE = {
    "version": st.integers(0, 2), "token": st.text(max_size=40), "host": st.text(max_size=20),
    "transport": st.sampled_from(["shm", "inline", "pigeon"]), "window": st.integers(-1, 100),
    "exp": st.just("x"), "run": st.integers(-1, 3), "detector": st.sampled_from(["epix100", "no"]),
    "events": st.lists(st.integers(-1, 1100), max_size=3), "event": st.integers(-1, 1100),
    "mode": st.sampled_from(MODES + ("best",)), "access_mode": st.sampled_from(["idx", "smd"]),
    "slots": st.lists(st.integers(-1, 9), max_size=3), "nbytes": st.integers(-1, 9),
}
# Requests a client could almost have sent (right types, odd values), and any JSON at all.
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS), "id": st.integers(0, 9), "version": st.integers(0, 2)},
    optional={k: v for k, v in PLAUSIBLE.items() if k != "version"})
anything = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | json_values, "id": st.integers(-1, 9) | json_values},
    optional={name: value | json_values for name, value in PLAUSIBLE.items()})


class Target:
    """A server the cases share, with what it looked like when last checked."""

    def __init__(self, server: ServerProcess, token: str = None) -> None:
        self.server = server
        self.token = token
        self.workers = set(server.workers)
        self.log_seen = 0
        self.cases = 0

    def hello(self, transport: str) -> bytes:
        hello = Hello(PROTOCOL_VERSION, self.token, socket.gethostname(), transport)
        return encode_frame(hello.to_header(0))

    def throw(self, data: bytes) -> None:
        """One case: send, say we are done, and expect a close; then check health."""
        with connect(self.server.address) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass          # the server refused it before reading it all
            assert closed_by_server(sock), "the server neither closed nor answered in full"
        with Client(self.server.address, token=self.token, transport="inline", timeout=10) as c:
            assert c.ping()
        workers, self.workers = self.workers, set(self.server.workers)
        log = self.server.log()
        new, self.log_seen = log[self.log_seen:], len(log)
        assert workers == self.workers, f"a worker died:\n{new}"
        assert "Traceback" not in new, new
        self.cases += 1


@pytest.fixture(scope="module")
def targets(tmp_path_factory, pytestconfig):
    tmp = tmp_path_factory.mktemp("fuzz")
    open_server = ServerProcess(["--workers", "2"], tmp)
    tokened = ServerProcess(["--workers", "2", "--token-file", str(tmp / "token")], tmp)
    found = {"open": Target(open_server),
             "tokened": Target(tokened, (tmp / "token").read_text().strip())}
    yield found
    for target in found.values():
        assert target.server.stop() == 0, target.server.log()
    record_figure(pytestconfig, f"fuzz: {sum(t.cases for t in found.values())} hostile inputs "
                                f"thrown at two running servers, each followed by a health check")


def _safe_for(name: str, data: bytes) -> bool:
    """Cases must not stop the open server through the front door (DONE)."""
    return name == "tokened" or not data.lstrip().startswith(b"DONE")


@pytest.mark.parametrize("name", ["open", "tokened"])
@FUZZ
@given(data=st.binary(min_size=1, max_size=400))
def test_random_bytes(targets, name, data):
    assume(_safe_for(name, data))
    targets[name].throw(data)


@pytest.mark.parametrize("name", ["open", "tokened"])
@FUZZ
@given(length=st.integers(0, 2**32 - 1), body=st.binary(max_size=200),
       first=st.sampled_from([b"", b"\x00", b"{", b"D", b"\xff"]))
def test_length_prefixes_of_any_size(targets, name, length, body, first):
    data = first + struct.pack(">I", length) + body
    assume(_safe_for(name, data))
    targets[name].throw(data)


@pytest.mark.parametrize("name", ["open", "tokened"])
@settings(FUZZ, max_examples=300)
@given(messages=st.lists(requests | anything, min_size=1, max_size=5), greet=st.booleans(),
       transport=st.sampled_from(["shm", "inline"]), cut=st.none() | st.integers(0, 2000))
def test_ill_formed_messages_and_truncated_frames(targets, name, messages, greet, transport,
                                                  cut):
    target = targets[name]
    if name == "open":
        assume(all(m.get("op") != "shutdown" for m in messages))
    try:
        data = b"".join(encode_frame(m) for m in messages)
    except ValueError:
        assume(False)     # not representable as JSON (nothing a client could send)
    if greet:
        data = target.hello(transport) + data
    target.throw(data if cut is None else data[:cut] or data)


@FUZZ
@given(hello=st.fixed_dictionaries(
    {"op": st.just("hello"), "id": st.integers(0, 9), "version": st.just(1)},
    optional={"token": st.text(max_size=64) | json_values, "host": PLAUSIBLE["host"],
              "window": st.integers(0, 100)}),
       then=st.lists(requests, max_size=3))
def test_hello_with_any_token(targets, hello, then):
    """The one door a stranger knocks on: every token but the right one is refused."""
    targets["tokened"].throw(b"".join(encode_frame(m) for m in [hello] + then))


@pytest.mark.parametrize("name", ["open", "tokened"])
@FUZZ
@given(depth=st.integers(1, 30000), inner=st.sampled_from(["list", "object"]),
       dialect=st.sampled_from(["v1", "legacy"]))
def test_deeply_nested_json(targets, name, depth, inner, dialect):
    nested = "[" * depth + "]" * depth if inner == "list" else '{"a":' * depth + "1" + "}" * depth
    body = f'{{"op": "get", "id": 1, "exp": {nested}}}'.encode()
    targets[name].throw(struct.pack(">I", len(body)) + body if dialect == "v1" else body)


@FUZZ
@given(request=st.fixed_dictionaries(
    {}, optional={"exp": st.just("x") | json_values, "run": st.integers(0, 2) | json_values,
                  "detector_name": st.sampled_from(["epix100", "no"]) | json_values,
                  "event": st.integers(-1, 1100) | json_values,
                  "mode": st.sampled_from(MODES + ("best",)) | json_values,
                  "access_mode": st.just("idx") | json_values}),
       tail=st.sampled_from([b"", b"ACK", b"AC", b"\x00" * 9, b"{}"]))
def test_legacy_requests(targets, request, tail):
    targets["open"].throw(json.dumps(request).encode() + tail)
