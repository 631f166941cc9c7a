"""Checking one XTC2 record before psana parses it.

psana's parser (xtcdata's XtcIterator) aborts the whole process on a record
whose headers disagree with its size ("corrupt xtc, would overrun buffer",
"corrupt xtc with too small extent"): a worker would die mid-request. Its
layout is simple enough to check first, in microseconds:

    record   timestamp (8 bytes), env (4), then one Xtc
    Xtc      two 32-bit words (the second holds the type id in its high
             16 bits), extent (4 bytes, header included), payload
    Parent (type 0) and ShapesData (type 1) hold a sequence of Xtcs; the
    other types hold plain data.

A record is sound when its Xtc's extent is the size read, and every Xtc
inside a container is at least a header long and ends within it.
"""
import struct
from typing import Optional

RECORD_HEADER = 12     # timestamp and env, before the record's Xtc
XTC_HEADER = 12
CONTAINERS = (0, 1)    # Parent, ShapesData


def record_size(buf: bytes, at: int = 0) -> int:
    """The size of the record starting at byte `at` of `buf`, from its
    header (which needs RECORD_HEADER + XTC_HEADER bytes there)."""
    extent, = struct.unpack_from("<I", buf, at + RECORD_HEADER + 8)
    return RECORD_HEADER + extent


def service_of(buf: bytes, at: int = 0) -> int:
    """The transition (psana's TransitionId) of the record at byte `at`."""
    env, = struct.unpack_from("<I", buf, at + RECORD_HEADER - 4)
    return (env >> 24) & 0xF


def record_problem(buf: bytes) -> Optional[str]:
    """What is wrong with the record `buf`, or None if psana may parse it."""
    if len(buf) < RECORD_HEADER + XTC_HEADER:
        return f"{len(buf)} bytes, shorter than a record's header"
    claimed = record_size(buf)
    if claimed != len(buf):
        return f"its header claims {claimed} bytes, the file holds {len(buf)}"
    return contents_problem(buf, RECORD_HEADER + XTC_HEADER, len(buf))


def contents_problem(buf: bytes, start: int, end: int) -> Optional[str]:
    """What is wrong with the Xtcs in buf[start:end], or None."""
    offset = start
    while offset < end:
        if end - offset < XTC_HEADER:
            return f"a truncated header at byte {offset}"
        _, contains, extent = struct.unpack_from("<III", buf, offset)
        if extent < XTC_HEADER or offset + extent > end:
            return f"an extent of {extent} bytes at byte {offset} overruns its container"
        if (contains >> 16) & 0xFFF in CONTAINERS:
            problem = contents_problem(buf, offset + XTC_HEADER, offset + extent)
            if problem:
                return problem
        offset += extent
    return None
