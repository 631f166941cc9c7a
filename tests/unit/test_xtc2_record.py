"""The record check that stands between psana's parser and a corrupt file:
sound records pass, a size field that cannot be right is named, and no
bytes at all make the check itself fail. psana-written records are checked
end to end in test_psana2_chunks; here records are built by hand in the
layout xtc2_record documents, to reach every size field."""
import struct

from hypothesis import given, strategies as st

from psana_ipc.server.sources.xtc2_record import RECORD_HEADER, XTC_HEADER, record_problem

PARENT, SHAPES_DATA, DATA = 0, 1, 3


def xtc(type_id: int, payload: bytes) -> bytes:
    return struct.pack("<III", 0x101, type_id << 16, XTC_HEADER + len(payload)) + payload


def record(payload: bytes) -> bytes:
    """An L1Accept record (env service 12) holding `payload` in its Parent Xtc."""
    return struct.pack("<QI", 1 << 32, 12 << 24) + xtc(PARENT, payload)


SOUND = record(xtc(SHAPES_DATA, xtc(DATA, bytes(range(40))) + xtc(DATA, b"\x07" * 8))
               + xtc(SHAPES_DATA, xtc(DATA, b"")))


def extent_fields(buf: bytes, start: int, end: int):
    """(offset of each Xtc's extent field, bytes from that Xtc to its container's end)."""
    while start < end:
        extent, = struct.unpack_from("<I", buf, start + 8)
        yield start + 8, end - start
        if struct.unpack_from("<I", buf, start + 4)[0] >> 16 in (PARENT, SHAPES_DATA):
            yield from extent_fields(buf, start + XTC_HEADER, start + extent)
        start += extent


CHILDREN = list(extent_fields(SOUND, RECORD_HEADER + XTC_HEADER, len(SOUND)))


def test_a_sound_record_passes():
    assert len(CHILDREN) == 5
    assert record_problem(SOUND) is None


@given(st.integers(0, 2**32 - 1))
def test_a_record_claiming_another_size_is_named(value):
    damaged = bytearray(SOUND)
    struct.pack_into("<I", damaged, RECORD_HEADER + 8, value)
    assert (record_problem(bytes(damaged)) is None) == (RECORD_HEADER + value == len(SOUND))


@given(st.sampled_from(CHILDREN), st.one_of(st.integers(0, XTC_HEADER - 1),
                                            st.integers(len(SOUND), 2**32 - 1)))
def test_an_xtc_too_small_or_overrunning_its_container_is_named(child, value):
    field, room = child
    damaged = bytearray(SOUND)
    struct.pack_into("<I", damaged, field, value)
    assert value < XTC_HEADER or value > room
    assert "overruns its container" in record_problem(bytes(damaged))


@given(st.binary(max_size=200))
def test_any_bytes_give_an_answer_not_an_exception(data):
    problem = record_problem(data)
    assert problem is None or isinstance(problem, str)


def test_a_truncated_read_is_named():
    assert "the file holds" in record_problem(SOUND[:-5])
    assert "shorter than a record's header" in record_problem(SOUND[:10])
