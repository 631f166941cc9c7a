"""The btx dialect: one request per connection, a fresh segment per event.

request -> read the frame into a new segment -> reply {name, shape, dtype}
-> wait for `ACK` (bounded by --ack-timeout) -> unlink. A client that
vanishes or never acknowledges costs the segment nothing: it is unlinked
either way. Old clients unlink the segment themselves as well, which is
harmless. `DONE` stops the whole server, as old launchers expect.

An event that cannot be read is answered as btx's own server does, with a
NaN frame of the mode's shape (btx and pypca filter those out), the error
beside it for clients that read one; when the shape is not known either,
with the error alone.
"""
import logging
import time
from typing import Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import READ_FAILED, UNAUTHORIZED, ProtocolError
from psana_ipc.protocol.legacy import (ACK, Done, Probe, legacy_error, legacy_missing_frame,
                                       legacy_probe_reply, legacy_reply, parse_legacy)

from .channel import Channel
from .context import WorkerContext, is_local_peer
from .shared_state import COL
from .shm import Segment
from .slots import BudgetExhausted

log = logging.getLogger(__name__)


class LegacyConnection(Channel):
    def __init__(self, sock, ctx: WorkerContext) -> None:
        super().__init__(sock)
        self.ctx = ctx
        self.buf = b""
        self.request = None
        self.arrived = 0.0
        self.segment: Optional[Segment] = None
        self.ack_deadline: Optional[float] = None

    def on_data(self, data: bytes) -> None:
        if self.segment is not None:
            seen = self.buf + data
            if ACK in seen:
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
            self.send(legacy_probe_reply())
            self.finish()
        elif isinstance(request, Done):
            log.info("DONE received: stopping the server")
            self.ctx.shutdown()
            self.finish()
        else:
            self.request = request
            self.arrived = time.monotonic()
            self.ctx.reader.row[COL["requests"]] += 1

    def next_arrival(self) -> float:
        return self.arrived

    def has_work(self) -> bool:
        return self.request is not None and self.segment is None and not self.closed

    def work(self) -> None:
        def allocate(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            self.segment = self.ctx.allocator.create(nbytes)
            return self.segment.array(shape, dtype)

        get = self.request
        try:
            data, meta = self.ctx.reader.read(get, get.events[0], allocate)
        except BudgetExhausted as e:
            if not self.retry_later():
                self._fail(e.code, e.message)
            return
        except ProtocolError as e:
            if e.code == READ_FAILED and self._send_nan_frame(e.message):
                return
            self._fail(e.code, e.message)
            return
        self.memory_found()
        self.send(legacy_reply(self.segment.name, data.shape, data.dtype.name,
                               timestamp=meta.timestamp, calibrated=meta.calibrated))
        self.ack_deadline = time.monotonic() + self.ctx.ack_timeout

    def _send_nan_frame(self, message: str) -> bool:
        """Reply with a NaN frame of the requested mode's shape; False when the
        shape is unknown or there is no memory for it."""
        get = self.request
        try:
            shape = self.ctx.reader.cache.get(get.key).specs()[get.mode].shape
        except Exception:    # the source cannot tell its shape: the error goes alone
            return False
        self.release()
        try:
            self.segment = self.ctx.allocator.create(int(np.prod(shape, dtype=np.int64)) * 4)
        except ProtocolError:    # no memory for it: the error goes alone
            return False
        self.segment.array(shape, np.float32).fill(np.nan)
        self.ctx.reader.state.count_error(self.ctx.reader.slot, READ_FAILED)
        self.send(legacy_missing_frame(self.segment.name, shape, READ_FAILED, message))
        self.ack_deadline = time.monotonic() + self.ctx.ack_timeout
        return True

    def tick(self, now: float) -> Optional[float]:
        if self.ack_deadline is not None:
            if now >= self.ack_deadline:
                log.warning("no ACK for %s within %.0fs: unlinking it", self.segment.name,
                            self.ctx.ack_timeout)
                self.close()
                return None
            return self.ack_deadline - now
        if self.request is None and now - self.last_activity > self.ctx.idle_timeout:
            self.close()
            return None
        return self.ctx.idle_timeout

    def _fail(self, code: str, message: str) -> None:
        self.ctx.reader.state.count_error(self.ctx.reader.slot, code)
        self.send(legacy_error(code, message))
        self.finish()

    def release(self) -> None:
        if self.segment is not None:
            self.ctx.allocator.destroy(self.segment)
            self.segment = None

