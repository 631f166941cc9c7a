"""The btx dialect: one request per connection, a fresh segment per event.

request -> reserve the frame's bytes from the budget -> read it into a new
segment -> reply {name, shape, dtype} -> wait for `ACK` (bounded by
--ack-timeout) -> retire (truncate and unlink) once acknowledged, only
unlink without an ACK. A client that vanishes or never acknowledges costs
the segment nothing: it is unlinked either way. Old clients unlink the
segment themselves as well, which is harmless. `DONE` stops the whole
server, as old launchers expect. Segment names are random (shm.py): a name
someone planted is passed over, never in the way.

With a frame cache (`--frame-cache`), the frame comes from the cache when it
is there (no source call) and goes into it when it is not: either way it is
copied into the fresh segment, since a legacy client unlinks what it is
given.

An event that cannot be read (psana returns nothing, or the event does not
hold the detector) is answered as btx's own server does, with a NaN frame
of the mode's shape (btx and pypca filter those out), the error beside it
for clients that read one: the segment is always large enough for a
float32 frame of the mode's shape. Only when the source cannot tell the
shape at all does the error go alone. A request flagged as a probe gets
the server's mark alone.
"""
import logging
import time
from typing import Any, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import (NO_DATA, NO_MEMORY, READ_FAILED, UNAUTHORIZED,
                                       ProtocolError)
from psana_ipc.protocol.legacy import (ACK, NAN_DTYPE, Done, LegacyError, LegacyFrame,
                                       LegacyMark, Probe, parse_legacy)

from . import cached_frames
from .channel import Channel
from .context import WorkerContext, is_local_peer
from .frame_cache import PENDING, Entry, Fill
from .frame_reader import Frame
from .groups import lone_key
from .pool_index import Grant, refusal
from .pool_pages import Held, round_up
from .shm import Segment
from .sources.base import frame_bytes

log = logging.getLogger(__name__)
UNREADABLE = (READ_FAILED, NO_DATA)     # answered with btx's NaN frame


class LegacyConnection(Channel):
    def __init__(self, sock, ctx: WorkerContext) -> None:
        super().__init__(sock)
        self.ctx = ctx
        self.memory = ctx.memory
        self.conn, self.group = ctx.next_connection(), lone_key()
        self.buf = b""
        self.request = None
        self.arrived = 0.0
        self.reserved: Optional[int] = None     # the budget's row for the segment
        self.nbytes: Optional[int] = None
        self.prefetched: Optional[Frame] = None
        self.segment: Optional[Segment] = None
        self.replied = False
        self.missing: Optional[ProtocolError] = None     # why the event cannot be read: NaNs
        self.cache_use: Union[Entry, Fill, None] = None     # with --frame-cache
        self.bypass = ctx.cache is None
        self.acked = False
        self.ack_deadline: Optional[float] = None

    def on_data(self, data: bytes) -> None:
        if self.replied:
            seen = self.buf + data
            if ACK in seen:
                self.acked = True
                self.finish()
            self.buf = seen[1 - len(ACK):]   # all an ACK split across reads needs
            return
        if self.request is not None:
            return  # bytes after a complete request are not part of this dialect
        self.buf += data
        try:
            request = parse_legacy(self.buf)
        except ProtocolError as e:
            self._fail(e.code, e.message)
            return
        if request is None:
            return
        self.buf = b""
        if not (self.ctx.legacy and is_local_peer(self.sock)):
            self._fail(UNAUTHORIZED, "the legacy protocol is disabled for this peer; use v1")
        elif isinstance(request, Probe):
            self.replied = True
            self.send(LegacyMark().to_bytes())
            self.finish()
        elif isinstance(request, Done):
            self.ctx.shutdown(True)
            self.replied = True
            self.send(LegacyMark().to_bytes())   # tells `psana-ipc stop` one was enough
            self.finish()
        else:
            self.request = request.get
            self.arrived = time.monotonic()
            self.ctx.counters.request()

    def next_arrival(self) -> float:
        return self.arrived

    def has_work(self) -> bool:
        return self.request is not None and not self.replied and not self.closed

    def reserve(self) -> Grant:
        """The segment's bytes from the budget, then the frame's cache entry
        (found, or reserved to be filled); PENDING while another worker fills it."""
        try:
            if self.segment is None:
                grant = self._reserve_segment()
                if grant is not Grant.GRANTED or self.segment is None:
                    return grant
            if self.missing is None and not self.bypass and self.cache_use is None:
                get = self.request
                found = cached_frames.find(self.ctx.cache, get, get.events[0],
                                           lambda: self.nbytes)
                if found is PENDING:
                    return Grant.PENDING
                self.cache_use, self.bypass = found, found is None
            return Grant.GRANTED
        except ProtocolError as e:
            self._fail(e.code, e.message)
            return Grant.GRANTED

    def _reserve_segment(self) -> Grant:
        get = self.request
        if self.nbytes is None:
            self.nbytes = self.ctx.reader.frame_size(get, get.events[0])
            if self.nbytes is None:    # only a read tells: read once, keep it while waiting
                try:
                    self.prefetched = self.ctx.reader.read_private(get, get.events[0])
                    self.nbytes = self.prefetched[0].nbytes
                except ProtocolError as e:
                    if e.code not in UNREADABLE or self._nan_shape() is None:
                        raise
                    self.missing, self.nbytes = e, 0
        shape = self._nan_shape()
        size = round_up(max(self.nbytes, frame_bytes(shape, NAN_DTYPE) if shape else 0))
        grant, self.reserved = self.memory.reserve(self.conn, self.group, size)
        if grant is Grant.GRANTED:
            self.segment = Segment(size, self.ctx.server_pid)
        return grant

    def refuse(self, grant: Grant) -> None:
        self._fail(NO_MEMORY, refusal(grant, self.nbytes, self.memory.index.budget))

    def work(self) -> None:
        if self.closed or self.close_after_flush:    # `reserve` answered with an error
            return
        if self.missing is not None:
            self._send_nan_frame(self.missing)
            return
        try:
            shape, dtype, timestamp, calibrated = self._read()
        except Held:                # a client of an earlier use of the entry still reads it
            self.cache_use, self.bypass = None, True
            self.work()
            return
        except ProtocolError as e:
            if e.code in UNREADABLE and self._send_nan_frame(e):
                return
            self._fail(e.code, e.message)
            return
        self.replied = True
        self.send(LegacyFrame(self.segment.name, shape, dtype.name, timestamp,
                              calibrated).to_bytes())
        self.ack_deadline = time.monotonic() + self.ctx.ack_timeout

    def _read(self) -> Tuple[Tuple[int, ...], np.dtype, Any, Any]:
        """The frame into the segment, from the frame cache when it serves this
        request (filling it first on a miss), else from the source; its shape,
        dtype, timestamp and `calibrated`."""
        get, use = self.request, self.cache_use
        if use is not None:
            self.cache_use = None
            entry, desc, kept = cached_frames.serve(self.ctx.cache, self.ctx.reader, get,
                                                    get.events[0], use, self.prefetched)
            if entry is None:
                self.prefetched = kept
            else:
                try:
                    cached_frames.copy_entry(self.ctx.cache, entry, desc, self.segment.array)
                finally:
                    self.ctx.cache.unpin(entry)
                return desc.shape, np.dtype(desc.dtype), desc.timestamp, desc.calibrated
        data, meta = self.ctx.reader.read(get, get.events[0], self.segment.array,
                                          self.segment.size, self.prefetched)
        return data.shape, data.dtype, meta.timestamp, meta.calibrated

    def _nan_shape(self) -> Optional[Tuple[int, ...]]:
        """The requested mode's shape, or None if the source cannot tell it."""
        get = self.request
        try:
            return tuple(self.ctx.reader.sources.get(get.key).specs()[get.mode].shape)
        except Exception:    # the source cannot tell its shape: the error goes alone
            return None


    def _send_nan_frame(self, error: ProtocolError) -> bool:
        """Reply with a NaN frame of the requested mode's shape in the reserved
        segment; False when the shape is unknown."""
        shape = self._nan_shape()
        if shape is None or self.segment is None:
            return False
        self.segment.array(shape, np.dtype(NAN_DTYPE)).fill(np.nan)
        self.ctx.counters.error(error.code)
        self.replied = True
        self.send(LegacyError(error.code, error.message, self.segment.name, shape).to_bytes())
        self.ack_deadline = time.monotonic() + self.ctx.ack_timeout
        return True

    def tick(self, now: float) -> Optional[float]:
        """Deadlines: the request within `first_request_within` of connecting,
        the ACK within --ack-timeout of the reply."""
        if self.ack_deadline is not None:
            if now >= self.ack_deadline:
                log.warning("no ACK for %s within %.0fs: unlinking it", self.segment.name,
                            self.ctx.ack_timeout)
                self.close()
                return None
            return self.ack_deadline
        since = self.expendable_since()
        if since is None:
            return None
        deadline = since + self.ctx.first_request_within
        if now >= deadline:
            self.close()
            return None
        return deadline

    def expendable_since(self) -> Optional[float]:
        return self.opened_at if self.request is None and not self.replied else None

    def _fail(self, code: str, message: str) -> None:
        self.ctx.counters.error(code)
        self.replied = True
        self.send(LegacyError(code, message).to_bytes())
        self.finish()

    def release(self) -> None:
        """An acknowledged segment is retired (its pages freed at once); one the
        client may still read is only unlinked. The budget and any cache entry
        are given back."""
        if isinstance(self.cache_use, Entry):
            self.ctx.cache.unpin(self.cache_use)
        elif isinstance(self.cache_use, Fill):
            self.ctx.cache.abandon(self.cache_use)
        if self.segment is not None:
            if self.acked:
                self.segment.retire()
            else:
                self.segment.destroy()
            self.segment = None
        if self.reserved is not None:
            self.memory.unreserve(self.reserved)
