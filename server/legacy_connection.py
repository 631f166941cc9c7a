"""The btx dialect: one request per connection, a fresh segment per event.

request -> reserve the frame's bytes -> read it into a new segment -> reply
{name, shape, dtype} -> wait for `ACK` (bounded by --ack-timeout) -> retire
(truncate and unlink) once acknowledged, only unlink without an ACK. A client that
vanishes or never acknowledges costs the segment nothing: it is unlinked
either way. Old clients unlink the segment themselves as well, which is
harmless. `DONE` stops the whole server, as old launchers expect.

With a frame cache (`--frame-cache`), the frame comes from the cache when it
is there (no source call) and goes into it when it is not: either way it is
copied into the fresh segment, since a legacy client unlinks what it is
given.

An event that cannot be read is answered as btx's own server does, with a
NaN frame of the mode's shape (btx and pypca filter those out) in the
segment reserved for the frame, the error beside it for clients that read
one. When the shape is not known, or a float32 frame of it does not fit
what was reserved (an integer mode narrower than 4 bytes), the error goes
alone. A request flagged as a probe gets the server's mark alone.
"""
import logging
import time
from typing import Any, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, READ_FAILED, UNAUTHORIZED, ProtocolError
from psana_ipc.protocol.legacy import (ACK, NAN_DTYPE, Done, LegacyError, LegacyFrame,
                                       LegacyMark, Probe, parse_legacy)

from .cached_frames import CacheRead, CachedFrames
from .channel import Channel
from .context import WorkerContext, is_local_peer
from .frame_reader import Frame
from .shared_state import Grant
from .shm import Segment, round_up
from .slots import Holding, refusal
from .sources.base import frame_bytes

log = logging.getLogger(__name__)


class LegacyConnection(Channel):
    def __init__(self, sock, ctx: WorkerContext) -> None:
        super().__init__(sock)
        self.ctx = ctx
        self.buf = b""
        self.request = None
        self.arrived = 0.0
        self.holding = Holding(ctx.budget)
        self.nbytes: Optional[int] = None
        self.prefetched: Optional[Frame] = None
        self.segment: Optional[Segment] = None
        self.replied = False
        self.missing: Optional[str] = None     # why the event cannot be read: send NaNs
        self.cached = CachedFrames(ctx.cache, ctx.reader)
        self.cache_read: Optional[CacheRead] = None     # with --frame-cache
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
            log.info("DONE received: stopping the server")
            self.ctx.shutdown()
            self.finish()
        else:
            self.request = request.get
            if self.ctx.cache is not None:
                self.cache_read = CacheRead(self.request, self.request.events[0])
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
            if self.missing is None and self.cache_read is not None \
                    and self.cached.reserve(self.cache_read, lambda: self.nbytes) is Grant.PENDING:
                return Grant.PENDING
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
                    shape = self._nan_shape()
                    if e.code != READ_FAILED or shape is None:
                        raise
                    self.missing, self.nbytes = e.message, frame_bytes(shape, NAN_DTYPE)
        size = round_up(self.nbytes)
        if size > self.ctx.budget.limit:
            return Grant.TOO_LARGE
        grant = self.holding.take(size)
        if grant is Grant.GRANTED:
            try:
                self.segment = self.ctx.budget.segment(size)
            except BaseException:
                self.holding.give(size)
                raise
        return grant

    def refuse(self, grant: Grant) -> None:
        self._fail(NO_MEMORY, refusal(grant, self.nbytes, self.ctx.budget.limit))

    def work(self) -> None:
        if self.closed or self.close_after_flush:    # `reserve` answered with an error
            return
        if self.missing is not None:
            self._send_nan_frame(self.missing)
            return
        try:
            shape, dtype, timestamp, calibrated = self._read()
        except ProtocolError as e:
            if e.code == READ_FAILED and self._send_nan_frame(e.message):
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
        get, read = self.request, self.cache_read
        if read is not None and self.cached.serves(read):
            read.prefetched = self.prefetched
            served = self.cached.serve(read)
            if served is not None:
                entry, desc = served
                try:
                    self.cached.copy_into(entry, desc, self.segment.array)
                finally:
                    self.cached.release(entry)
                return desc.shape, np.dtype(desc.dtype), desc.timestamp, desc.calibrated
        data, meta = self.ctx.reader.read(get, get.events[0], self.segment.array,
                                          self.segment.size,
                                          self.prefetched or (read.prefetched if read else None))
        return data.shape, data.dtype, meta.timestamp, meta.calibrated

    def _nan_shape(self) -> Optional[Tuple[int, ...]]:
        """The requested mode's shape, or None if the source cannot tell it."""
        get = self.request
        try:
            return tuple(self.ctx.reader.cache.get(get.key).specs()[get.mode].shape)
        except Exception:    # the source cannot tell its shape: the error goes alone
            return None

    def _send_nan_frame(self, message: str) -> bool:
        """Reply with a NaN frame of the requested mode's shape in the reserved
        segment; False when the shape is unknown or the frame does not fit."""
        shape = self._nan_shape()
        if shape is None or self.segment is None \
                or frame_bytes(shape, NAN_DTYPE) > self.segment.size:
            return False
        self.segment.array(shape, np.dtype(NAN_DTYPE)).fill(np.nan)
        self.ctx.counters.error(READ_FAILED)
        self.replied = True
        self.send(LegacyError(READ_FAILED, message, self.segment.name, shape).to_bytes())
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
        client may still read is only unlinked."""
        if self.cache_read is not None:
            self.cached.forget(self.cache_read)
        if self.segment is not None:
            if self.acked:
                self.segment.retire()
            else:
                self.segment.destroy()
            self.holding.give(self.segment.size)
            self.segment = None
