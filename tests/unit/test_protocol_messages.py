"""Every message of both dialects, as one value both ends share: built, turned
into its header (or bytes), framed, decoded and parsed back, it is the same
value. Plain unit tests: no sockets (the protocol is sans-I/O)."""
import json

import pytest
from hypothesis import given, strategies as st

from psana_ipc.protocol import PROTOCOL_VERSION, errors
from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.framing import FrameDecoder, encode_frame
from psana_ipc.protocol.legacy import (Done, LegacyError, LegacyFrame, LegacyGet, LegacyMark,
                                       Probe, is_ours, parse_legacy, parse_legacy_reply)
from psana_ipc.protocol.messages import (MODES, REDUCERS, TRANSPORTS, CodeFilter, FieldRef,
                                         Follow, FreeArenas, Get, Hello, Info, Into, MakeArena,
                                         Ping, Prefetch, Release, RunKey, Shutdown, Stats,
                                         frame_nbytes, parse_request)
from psana_ipc.protocol.replies import (ArenaMade, ArenaWritten, ErrorReply, FrameDesc,
                                        FrameReply, InfoReply, Inline, InPool, Pong, Queued,
                                        RunProgress, Skipped, StatsReply, Stopping, Welcome,
                                        WrittenFrame, parse_reply)

text = st.text(max_size=20)
names = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:-",
                min_size=1, max_size=12).filter(lambda n: not n.startswith("_"))
ids = st.integers(0, 2**31)
counts = st.integers(0, 2**40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=10)


def json_objects(reserved=frozenset()):
    return st.dictionaries(st.text(max_size=8).filter(lambda k: k not in reserved), json_values,
                           max_size=4)


# -- v1 requests ---------------------------------------------------------------------------
run_keys = st.builds(RunKey, text, ids, text, text)
events = st.lists(counts, min_size=1, max_size=20).map(tuple)
field_refs = st.builds(FieldRef, names, names, names, st.none() | st.sampled_from(REDUCERS))
codes = st.lists(st.integers(0, 300), max_size=4, unique=True).map(tuple)
code_filters = st.tuples(codes, codes).filter(
    lambda c: (c[0] or c[1]) and not set(c[0]) & set(c[1])).map(lambda c: CodeFilter(*c))
shapes = st.lists(st.integers(0, 4096), max_size=4).map(tuple)


@st.composite
def gets_into(draw):
    evts = draw(events)
    into = Into(draw(counts), tuple(draw(st.lists(counts, min_size=len(evts),
                                                  max_size=len(evts)))),
                draw(shapes), draw(text))
    return Get(draw(run_keys), draw(st.sampled_from(MODES)), evts,
               draw(st.lists(field_refs, max_size=3).map(tuple)), into=into)


plain_gets = st.builds(Get, run_keys, st.sampled_from(MODES), events,
                       st.lists(field_refs, max_size=5).map(tuple), st.booleans())
requests = st.one_of(
    st.builds(Hello, st.integers(0, 9), st.none() | text, text, st.sampled_from(TRANSPORTS),
              st.integers(0, 4096), st.none() | text),
    st.builds(Info, text, ids, st.none() | text, st.booleans(), st.none() | code_filters),
    plain_gets,
    gets_into(),
    st.builds(Prefetch, run_keys, st.sampled_from(MODES), events),
    st.builds(MakeArena, st.integers(1, 2**40), st.booleans()),
    st.builds(FreeArenas, st.lists(counts, max_size=5).map(tuple)),
    st.builds(Release, st.lists(ids, max_size=20).map(tuple)),
    st.builds(Ping), st.builds(Stats),
    st.builds(Shutdown, st.none() | text),
    st.builds(Follow, text, ids, text, st.integers(-1, 2**40), st.none() | code_filters,
              st.booleans()),
)


def through_the_wire(header, payload=b"", max_payload=0):
    """A header framed, split in two, and decoded as the server decodes."""
    data = encode_frame(header) + payload
    decoder = FrameDecoder(max_payload=max_payload)
    decoder.receive_data(data[: len(data) // 2])
    first = decoder.next_frame()
    decoder.receive_data(data[len(data) // 2:])
    frame = first or decoder.next_frame()
    assert frame is not None and decoder.next_frame() is None
    return frame


@given(requests, ids)
def test_every_request_round_trips(request, rid):
    assert parse_request(through_the_wire(request.to_header(rid)).header) == (rid, request)


def test_a_request_says_only_what_differs_from_its_defaults():
    """The bytes a client has always sent: optional fields are left out."""
    assert Hello(1, host="h").to_header(0) == {"op": "hello", "id": 0, "version": 1,
                                               "host": "h", "transport": "shm"}
    assert Get(RunKey("x", 1, "d"), "raw", (4,)).to_header(2) == {
        "op": "get", "id": 2, "exp": "x", "run": 1, "detector": "d", "mode": "raw",
        "events": [4], "access_mode": "idx"}
    assert Info("x", 1).to_header(3) == {"op": "info", "id": 3, "exp": "x", "run": 1}
    assert Shutdown().to_header(4) == {"op": "shutdown", "id": 4}
    assert MakeArena(8).to_header(5) == {"op": "arena", "id": 5, "size": 8}
    assert MakeArena(8, wait=False).to_header(5) == {"op": "arena", "id": 5, "size": 8,
                                                     "wait": False}
    assert Follow("x", 1, "d").to_header(6) == {"op": "follow", "id": 6, "exp": "x", "run": 1,
                                                "detector": "d", "after": -1}
    with pytest.raises(ProtocolError) as e:
        parse_request({"op": "follow", "id": 7, "exp": "x", "run": 1, "detector": "d",
                       "after": -2})
    assert e.value.code == errors.BAD_REQUEST


def test_event_code_filters_and_batch_values_are_checked_where_they_are_made():
    assert CodeFilter.parse({"with": [40]}) == CodeFilter((40,))
    assert CodeFilter.parse({"without": (41, 280)}).to_json() == {"with": [], "without": [41, 280]}
    for bad in ({"with": []}, {"with": [40], "without": [40]}, {"with": [-1]}, {"with": [True]},
                {"when": [1]}, [40], {"with": 40}, {"with": list(range(65))}):
        with pytest.raises(ProtocolError) as e:
            CodeFilter.parse(bad)
        assert e.value.code == errors.BAD_REQUEST
    ref = FieldRef.parse("sum(hsd.fex.calib)")
    assert (ref.reduce, ref.plain, ref.name) == ("sum", "hsd.fex.calib", "sum(hsd.fex.calib)")
    assert FieldRef.parse("epics.HX2:DVD(1)").reduce is None
    for bad in ("mean(hsd.calib)", "sum(hsd)", "sum(hsd._raw)"):
        with pytest.raises(ProtocolError) as e:
            FieldRef.parse(bad)
        assert e.value.code == errors.BAD_REQUEST


# -- v1 replies ----------------------------------------------------------------------------
descs = st.builds(FrameDesc, shapes, text, st.none() | json_objects(), st.booleans(),
                  json_objects(frozenset({"ok", "id", "seq", "event", "done", "handle", "pool",
                                          "offset", "size", "ticket", "nbytes", "shape",
                                          "dtype", "timestamp", "calibrated", "skipped",
                                          "message"})))
dones = st.booleans()


wheres = st.builds(Inline, st.integers(0, 64)) | st.builds(InPool, ids, st.integers(0, 1),
                                                            counts, counts, counts)
frame_replies = st.builds(FrameReply, ids, ids, counts, dones, descs, wheres)


written = st.builds(WrittenFrame, ids, counts, descs)
any_get = Get(RunKey("x", 1, "d"), "raw", (1,))
into_get = Get(RunKey("x", 1, "d"), "raw", (1,), into=Into(5, (0,), (2,), "<f4"))
REPLIES = [
    (st.builds(Welcome, ids, ids, st.sampled_from(TRANSPORTS), ids, text, ids, text, text, ids),
     Hello(PROTOCOL_VERSION)),
    (st.builds(InfoReply, ids, json_objects(frozenset({"ok", "id", "nbytes"}))),
     Info("x", 1)),
    (st.builds(Queued, ids, ids), Prefetch(RunKey("x", 1, "d"), "raw", (1,))),
    (st.builds(Pong, ids), Ping()),
    (st.builds(StatsReply, ids, json_objects()), Stats()),
    (st.builds(Stopping, ids), Shutdown()),
    (st.builds(ArenaMade, ids, counts, st.integers(0, 1), counts, counts), MakeArena(1)),
    (st.builds(Skipped, ids, ids, counts, text, dones), any_get),
    (frame_replies, any_get),
    (st.builds(ArenaWritten, ids, counts, st.lists(written, max_size=4).map(tuple)), into_get),
    (st.builds(RunProgress, ids, st.lists(counts, max_size=8).map(tuple), counts, counts, counts,
               st.booleans(), text, st.floats(0, 1e9), st.integers(-1, 2**31)),
     Follow("x", 1, "d")),
    (st.builds(ErrorReply, st.integers(-1, 2**31), st.sampled_from(sorted(errors.ALL_CODES)),
               text, st.none() | dones, st.none() | ids, st.none() | counts), None),
]


@pytest.mark.parametrize("replies, request_", REPLIES,
                         ids=[type(r).__name__ if r else "any" for _, r in REPLIES])
@given(data=st.data())
def test_every_reply_round_trips(replies, request_, data):
    """As the server sends it, framed, decoded as the client decodes, and
    parsed with the request it answers."""
    reply = data.draw(replies)
    inline = isinstance(reply, FrameReply) and isinstance(reply.where, Inline)
    payload = b"\0" * reply.where.nbytes if inline else b""
    frame = through_the_wire(reply.to_header(), payload, max_payload=64)
    waiting = {} if request_ is None else {reply.rid: request_}
    assert parse_reply(frame.header, waiting) == reply


def test_a_hello_reply_without_the_workers_count_reads_as_not_told():
    """A server of an earlier release does not say how many workers it has:
    0, which has the client ask it (`stats`)."""
    header = Welcome(3, PROTOCOL_VERSION, "shm", 8, "synthetic", 11, "g", "door", 4).to_header()
    assert parse_reply(header, {3: Hello(PROTOCOL_VERSION)}).workers == 4
    del header["workers"]
    assert parse_reply(header, {3: Hello(PROTOCOL_VERSION)}).workers == 0


def test_an_error_answers_any_id_and_only_an_error_answers_what_waits_for_none():
    error = ErrorReply(-1, errors.BAD_FRAME, "no")
    assert parse_reply(error.to_header(), {}) == error
    with pytest.raises(ProtocolError):
        parse_reply(Pong(7).to_header(), {})
    with pytest.raises(ProtocolError):
        parse_reply(Pong(7).to_header(), {7: Release((1,))})


@pytest.mark.parametrize("header", [
    {"ok": True, "id": 1, "seq": 0, "event": 1, "done": True, "shape": [2], "dtype": "<f4"},
    {"ok": True, "id": 1, "seq": 0, "event": 1, "done": "yes", "shape": [2], "dtype": "<f4",
     "nbytes": 8},
    {"ok": True, "id": 1, "seq": 0, "event": 1, "done": True, "shape": [True], "dtype": "<f4",
     "nbytes": 8},
    {"ok": True, "id": 1, "seq": 0, "event": 1, "done": True, "shape": [2], "dtype": "<f4",
     "handle": 3, "pool": 0, "offset": 0, "size": 8192},
    {"ok": True, "id": 1, "seq": 0, "event": 1, "done": True, "shape": [2], "dtype": "<f4",
     "handle": 3, "pool": 0, "offset": "0", "size": 8192, "ticket": 5},
])
def test_a_reply_missing_or_mistyping_a_field_is_refused(header):
    with pytest.raises(ProtocolError) as e:
        parse_reply(header, {1: Get(RunKey("x", 1, "d"), "raw", (1,))})
    assert e.value.code == errors.BAD_FRAME


def test_a_frame_reply_says_where_the_frame_is_in_one_union():
    desc = FrameDesc((2, 3), "<f4", {"time": 5}, False, {"values": {}})
    assert FrameReply(9, 0, 4, True, desc, InPool(1, 0, 8192, 4096, 77)).to_header() == {
        "ok": True, "id": 9, "seq": 0, "event": 4, "done": True, "shape": [2, 3],
        "dtype": "<f4", "timestamp": {"time": 5}, "calibrated": False, "values": {},
        "handle": 1, "pool": 0, "offset": 8192, "size": 4096, "ticket": 77}
    assert FrameReply(9, 0, 4, True, desc, Inline(24)).to_header()["nbytes"] == 24
    assert list(ErrorReply(3, errors.NO_DATA, "m", True, 1, 5).to_header()) == [
        "ok", "id", "code", "message", "done", "seq", "event"]


# -- the legacy dialect ---------------------------------------------------------------------
runs = ids | st.from_regex(r"\A[0-9]{1,6}\Z")
legacy_gets = st.builds(LegacyGet, text, runs, text, counts, st.text(min_size=1, max_size=8),
                        st.sampled_from(MODES))
legacy_requests = st.one_of(legacy_gets, st.builds(Probe, st.none() | legacy_gets),
                            st.builds(Done))
legacy_replies = st.one_of(
    st.builds(LegacyFrame, text, shapes, text, st.none() | json_objects(),
              st.none() | st.booleans()),
    st.builds(LegacyFrame, text, shapes, text, marked=st.just(False)),
    st.builds(LegacyError, st.sampled_from(sorted(errors.ALL_CODES)), text),
    st.builds(LegacyError, st.sampled_from(sorted(errors.ALL_CODES)), text, text, shapes),
    st.builds(LegacyMark),
)


@given(legacy_requests)
def test_every_legacy_request_round_trips(request):
    data = request.to_bytes()
    assert parse_legacy(data) == request


@given(legacy_replies)
def test_every_legacy_reply_round_trips(reply):
    data = reply.to_bytes()
    assert parse_legacy_reply(data[:-1]) is None      # not complete yet: read on
    assert parse_legacy_reply(data) == reply
    assert is_ours(reply) == reply.marked


def test_legacy_messages_are_the_bytes_btx_clients_read():
    assert LegacyGet("xpptut15", "14", "epix10k2M", 3).to_bytes() == (
        b'{"exp": "xpptut15", "run": "14", "access_mode": "idx", '
        b'"detector_name": "epix10k2M", "event": 3, "mode": "calib"}')
    assert LegacyGet("x", "14", "d", 3).get.key.run == 14
    mark = PROTOCOL_VERSION       # the mark's value: the v1 version the server also speaks
    assert LegacyFrame("psipc_1_2_3", (2, 3), "float32", {"time": 1}, True).to_bytes() == (
        b'{"name": "psipc_1_2_3", "shape": [2, 3], "dtype": "float32", "psana_ipc": %d, '
        b'"timestamp": {"time": 1}, "calibrated": true}' % mark)
    assert json.loads(LegacyError("read_failed", "gone", "psipc_1_2_3", (2,)).to_bytes()) == {
        "name": "psipc_1_2_3", "shape": [2], "dtype": "float32", "error": "gone",
        "code": "read_failed", "message": "gone", "traceback": "read_failed: gone",
        "psana_ipc": mark}
    assert LegacyMark().to_bytes() == b'{"psana_ipc": %d}' % mark


def test_old_servers_replies_are_read_unmarked():
    frame = parse_legacy_reply(b'{"name": "psm_1", "shape": [2, 2], "dtype": "float32"}')
    assert frame == LegacyFrame("psm_1", (2, 2), "float32", marked=False)
    maxie = parse_legacy_reply(b'{"error": "boom", "traceback": "..."}')
    assert maxie == LegacyError(errors.INTERNAL, "boom", marked=False) and not is_ours(maxie)
    with pytest.raises(ProtocolError):
        parse_legacy_reply(b"[1, 2]")


def test_a_probe_this_server_could_not_serve_still_gets_the_mark():
    assert parse_legacy(b'{"psana_ipc_probe": true, "run": "r14"}') == Probe(None)


def test_a_legacy_request_is_validated_like_the_server_always_did():
    with pytest.raises(ProtocolError) as e:
        LegacyGet("x", "r14", "d", 1)
    assert e.value.code == errors.BAD_REQUEST
    with pytest.raises(ProtocolError) as e:
        LegacyGet("x", 1, "d", 1, mode="smooth")
    assert e.value.code == errors.UNKNOWN_MODE
    with pytest.raises(ProtocolError):
        LegacyGet("x", 1, "d", -1)


def test_frame_sizes_are_python_integers():
    assert frame_nbytes((2 ** 40, 2 ** 40), 8) == 2 ** 83
    assert frame_nbytes((), 4) == 4
