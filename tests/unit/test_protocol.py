"""The wire format as plain unit tests: no sockets (the protocol is sans-I/O)."""
import json
import stat
import struct

import pytest
from hypothesis import given, strategies as st

from psana_ipc.protocol import errors
from psana_ipc.protocol.address import (address_family, format_address, is_loopback,
                                        parse_address)
from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.framing import MAX_HEADER, FrameDecoder, encode_frame
from psana_ipc.protocol.legacy import Done, is_v1, parse_legacy
from psana_ipc.protocol.messages import (MAX_EVENTS_PER_GET, MAX_FIELDS, MODES, FieldRef, Get,
                                         Hello, Prefetch, Release, RunKey, parse_request)
from psana_ipc.protocol.shm_names import (is_own_file, ours, parse_segment_name, segment_name,
                                          segment_path)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


header_keys = st.text(max_size=10).filter(lambda k: k != "nbytes")   # nbytes: a payload follows


@given(st.lists(st.dictionaries(header_keys, json_values, max_size=5), min_size=1, max_size=5),
       st.integers(1, 64))
def test_frames_survive_any_split(headers, chunk):
    stream = b"".join(encode_frame(h) for h in headers)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        decoder.receive_data(stream[i:i + chunk])
        while True:
            frame = decoder.next_frame()
            if frame is None:
                break
            got.append(frame.header)
    assert got == headers


def test_frame_split_at_every_byte_yields_nothing_until_complete():
    data = encode_frame({"op": "ping", "id": 1})
    decoder = FrameDecoder()
    for b in data[:-1]:
        decoder.receive_data(bytes([b]))
        assert decoder.next_frame() is None
    decoder.receive_data(data[-1:])
    assert decoder.next_frame().header == {"op": "ping", "id": 1}


@given(st.integers(0, 300), st.integers(1, 64))
def test_a_blocking_reader_takes_the_payload_into_its_own_memory(size, over):
    """The client's steps: receive exactly what is `missing` until the header
    is there, then take what is buffered of the payload and receive the rest
    itself; nothing of the next frame is taken early."""
    payload = bytes(range(256)) * 2
    stream = encode_frame({"id": 1, "nbytes": size}) + payload[:size] + encode_frame({"id": 2})
    decoder = FrameDecoder(max_payload=1 << 20)
    pos = 0
    while decoder.next_header() is None:
        n = decoder.missing
        decoder.receive_data(stream[pos:pos + n])
        pos += n
    head = decoder.next_header()
    assert head.header == {"id": 1, "nbytes": size} and head.size == size
    early = min(over, size)                       # a reader that had some payload bytes already
    decoder.receive_data(stream[pos:pos + early])
    pos += early
    into = bytearray(size)
    got = decoder.take_payload(memoryview(into))
    assert got == early
    into[got:] = stream[pos:pos + size - got]
    pos += size - got
    assert bytes(into) == payload[:size]
    decoder.receive_data(stream[pos:])
    assert decoder.next_frame() == ({"id": 2}, None)


def test_header_over_the_cap_is_refused_before_buffering():
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", MAX_HEADER + 1))
    with pytest.raises(ProtocolError) as e:
        decoder.next_frame()
    assert e.value.code == errors.HEADER_TOO_LARGE
    with pytest.raises(ProtocolError):     # the decoder stays broken
        decoder.next_frame()


@pytest.mark.parametrize("body, code", [
    (b"{not json", errors.BAD_JSON),
    (b"\xff\xfe", errors.BAD_JSON),
    (b"[1, 2]", errors.BAD_JSON),
    (b"[" * 100 + b"]" * 100, errors.BAD_JSON),
    (json.dumps({"a": {"b": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}})
     .encode(), errors.BAD_JSON),
])
def test_bad_headers_have_codes(body, code):
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError) as e:
        decoder.next_frame()
    assert e.value.code == code


def test_payload_from_a_client_is_refused():
    decoder = FrameDecoder(max_payload=0)
    decoder.receive_data(encode_frame({"op": "ping", "id": 1, "nbytes": 10}) + b"x" * 10)
    with pytest.raises(ProtocolError) as e:
        decoder.next_frame()
    assert e.value.code == errors.BAD_FRAME


def test_requests_are_validated():
    rid, get = parse_request({"op": "get", "id": 7, "exp": "xpptut15", "run": 14,
                              "detector": "epix10k2M", "events": [1, 2], "mode": "raw"})
    assert rid == 7 and isinstance(get, Get) and get.events == (1, 2) and get.key.run == 14
    assert parse_request({"op": "release", "id": 1, "handles": [0, 3]})[1] == Release((0, 3))
    assert isinstance(parse_request({"op": "hello", "id": 0, "version": 1})[1], Hello)


prefetches = st.builds(
    Prefetch,
    st.builds(RunKey, st.text(min_size=1, max_size=20), st.integers(0, 2**31),
              st.text(min_size=1, max_size=20), st.sampled_from(["idx", "smd"])),
    st.sampled_from(MODES),
    st.lists(st.integers(0, 2**40), min_size=1, max_size=50).map(tuple))


@given(prefetches, st.integers(0, 2**31))
def test_prefetch_round_trips_through_the_wire(prefetch, rid):
    """As a client sends it (Client.prefetch), framed, decoded and validated."""
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(prefetch.to_header(rid)))
    assert parse_request(decoder.next_frame().header) == (rid, prefetch)
    assert prefetch.get() == Get(prefetch.key, prefetch.mode, prefetch.events)


def test_a_prefetch_is_validated_like_a_get():
    key = RunKey("x", 1, "d")
    with pytest.raises(ProtocolError):
        Prefetch(key, "calib", ())
    with pytest.raises(ProtocolError) as e:
        Prefetch(key, "calib", tuple(range(MAX_EVENTS_PER_GET + 1)))
    assert "per prefetch" in e.value.message
    with pytest.raises(ProtocolError) as e:
        Prefetch(key, "smooth", (1,))
    assert e.value.code == errors.UNKNOWN_MODE


@pytest.mark.parametrize("header, code", [
    ({"op": "fly", "id": 1}, errors.UNKNOWN_OP),
    ({"id": 1}, errors.UNKNOWN_OP),
    ({"op": "ping"}, errors.BAD_REQUEST),
    ({"op": "ping", "id": True}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": "14", "detector": "d", "events": [1]},
     errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [-1]},
     errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": []},
     errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1.5]},
     errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1], "mode": "x"},
     errors.UNKNOWN_MODE),
    ({"op": "get", "id": 1, "exp": 3, "run": 1, "detector": "d", "events": [1]},
     errors.BAD_REQUEST),
    ({"op": "hello", "id": 1, "version": 1, "transport": "pigeon"}, errors.BAD_REQUEST),
    ({"op": "release", "id": 1, "handles": ["a"]}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": "ebeam.ebeamPhotonEnergy"}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": [3]}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": ["ebeam"]}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": ["a.b.c.d"]}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": ["epix.raw._mask"]}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": ["ebeam..x"]}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "fields": ["e.x"] * (MAX_FIELDS + 1)}, errors.BAD_REQUEST),
    ({"op": "get", "id": 1, "exp": "x", "run": 1, "detector": "d", "events": [1],
      "skip_incomplete": 1}, errors.BAD_REQUEST),
    ({"op": "info", "id": 1, "exp": "x", "run": 1, "present": "yes"}, errors.BAD_REQUEST),
])
def test_bad_requests_have_codes(header, code):
    with pytest.raises(ProtocolError) as e:
        parse_request(header)
    assert e.value.code == code


names = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:-",
                min_size=1, max_size=12).filter(lambda n: not n.startswith("_"))
field_refs = st.builds(FieldRef, names, names, names)


@given(st.lists(field_refs, max_size=MAX_FIELDS), st.booleans(),
       st.lists(st.integers(0, 2**40), min_size=1, max_size=8))
def test_field_lists_round_trip(fields, skip, events):
    """A get's fields as the client writes them parse back into the same
    frozen values, through the JSON a frame carries."""
    header = Get(RunKey("x", 1, "epix10k2M"), "calib", tuple(events), tuple(fields),
                 skip).to_header(3)
    decoded = FrameDecoder()
    decoded.receive_data(encode_frame(header))
    rid, get = parse_request(decoded.next_frame().header)
    assert rid == 3 and get.fields == tuple(fields) and get.skip_incomplete is skip
    assert get == Get(get.key, "calib", tuple(events), tuple(fields), skip)
    assert all(FieldRef.parse(f.name) == f for f in fields)


def test_legacy_requests_parse_when_complete():
    req = json.dumps({"exp": "xpptut15", "run": 14, "access_mode": "idx",
                      "detector_name": "epix10k2M", "event": 3, "mode": "calib"}).encode()
    assert parse_legacy(req[:10]) is None
    get = parse_legacy(req).get
    assert get.key.detector == "epix10k2M" and get.events == (3,) and get.mode == "calib"
    assert isinstance(parse_legacy(b"DONE"), Done)
    assert parse_legacy(b"DO") is None
    with pytest.raises(ProtocolError):
        parse_legacy(b"hello there")
    with pytest.raises(ProtocolError) as e:
        parse_legacy(json.dumps({"exp": "x", "run": 1}).encode())
    assert e.value.code == errors.BAD_REQUEST


def test_dialects_differ_in_the_first_byte():
    assert is_v1(encode_frame({"op": "hello", "id": 0})[0])
    assert not is_v1(b"{"[0]) and not is_v1(b"DONE"[0])


def test_segment_names_round_trip():
    name = segment_name(123, 456, "a1")
    parsed = parse_segment_name(name)
    assert (parsed.server_pid, parsed.worker_pid, parsed.serial) == (123, 456, "a1")
    assert parse_segment_name("psm_1234") is None


def test_addresses():
    assert parse_address("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_address(":6000") == ("127.0.0.1", 6000)
    assert parse_address("/tmp/x.sock") == "/tmp/x.sock"
    assert parse_address("unix:rel.sock") == "rel.sock"
    assert parse_address(("localhost", "5000")) == ("localhost", 5000)
    assert format_address(("::1", 5)) == "[::1]:5"
    with pytest.raises(ValueError):
        parse_address("nohost")


@pytest.mark.parametrize("text, family", [("unix:/tmp/x.sock", "AF_UNIX"),
                                          ("127.0.0.1:5000", "AF_INET"),
                                          ("[::1]:5000", "AF_INET6")])
def test_address_family_names_the_socket_constant(text, family):
    assert address_family(parse_address(text)) == family


def test_segments_are_picked_from_a_listing_by_server_and_worker():
    listing = ["psipc_1_2_a", "psipc_1_3_b", "psipc_4_2_c", "sem.x", "psipc_x_2_d", "pym-1"]
    assert list(ours(listing)) == ["psipc_1_2_a", "psipc_1_3_b", "psipc_4_2_c"]
    assert list(ours(listing, server_pid=1)) == ["psipc_1_2_a", "psipc_1_3_b"]
    assert list(ours(listing, server_pid=1, worker_pid=3)) == ["psipc_1_3_b"]
    assert segment_path("/psipc_1_2_a") == "/dev/shm/psipc_1_2_a"


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                         ("::ffff:127.0.0.1", True), ("localhost", True),
                                         ("0.0.0.0", False), ("10.0.0.1", False),
                                         ("::ffff:10.0.0.1", False), ("1270.0.0.1", False)])
def test_loopback_hosts(host, local):
    assert is_loopback(host) is local


def test_only_a_regular_file_of_the_user_is_ours():
    assert is_own_file(stat.S_IFREG | 0o600, 1000, 1000)
    assert not is_own_file(stat.S_IFREG | 0o600, 0, 1000)
    assert not is_own_file(stat.S_IFLNK | 0o777, 1000, 1000)
    assert not is_own_file(stat.S_IFDIR | 0o700, 1000, 1000)
