"""The v1 dialect on one persistent connection.

Requests are handled in arrival order and may be pipelined. A `get` becomes
one work item per event; the worker's loop runs one item at a time across
all its connections, so a long `get` does not starve other clients. Each
event gets its own reply (with `seq`); the last reply of a request carries
`done: true`. Frames go into slots of this connection's pool (shared memory)
or inline after the header; either way at most `window` frames are
outstanding, which is the back-pressure a slow client feels.
"""
import hmac
import logging
import os
import time
from collections import deque
from typing import Any, Deque, Dict, NamedTuple, Optional, Tuple

import numpy as np

from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.errors import (BAD_SLOT, BUSY, NOT_FOUND, NOT_READY, UNAUTHORIZED,
                                       UNKNOWN_DETECTOR, UNKNOWN_SOURCE, VERSION, ProtocolError)
from psana_ipc.protocol.framing import FrameDecoder, encode_frame
from psana_ipc.protocol.messages import (Get, Hello, Info, Ping, Release, Shutdown, Stats,
                                         error_reply, ok_reply, parse_request, request_id)

from .channel import Channel
from .context import WorkerContext, is_local_peer
from .shared_state import COL
from .slots import BudgetExhausted, SlotPool

log = logging.getLogger(__name__)
MAX_QUEUED_EVENTS = 8192       # events queued per connection before gets are refused
REQUEST_ERRORS = (NOT_FOUND, UNKNOWN_DETECTOR, UNKNOWN_SOURCE)   # no use trying further events


class Item(NamedTuple):
    rid: int
    get: Get
    seq: int
    arrived: float


class V1Connection(Channel):
    def __init__(self, sock, ctx: WorkerContext) -> None:
        super().__init__(sock)
        self.ctx = ctx
        self.decoder = FrameDecoder()
        self.local = is_local_peer(sock)
        self.hello: Optional[Hello] = None
        self.pool: Optional[SlotPool] = None
        self.inline = False
        self.window = ctx.window
        self.queue: Deque[Item] = deque()
        self.inline_pending = 0

    # -- input ----------------------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        while not self.closed:
            try:
                frame = self.decoder.next_frame()
            except ProtocolError as e:
                self._fail(-1, e.code, e.message)
                self.finish()
                return
            if frame is None:
                return
            self._handle(frame.header)

    def _handle(self, header: Dict[str, Any]) -> None:
        try:
            rid, request = parse_request(header)
        except ProtocolError as e:
            self._fail(request_id(header), e.code, e.message)
            return
        if isinstance(request, Hello):
            self._hello(rid, request)
        elif self.hello is None:
            self._fail(rid, NOT_READY, "the first request on a connection must be hello")
        elif isinstance(request, Get):
            self.ctx.reader.row[COL["requests"]] += 1
            if len(self.queue) + len(request.events) > MAX_QUEUED_EVENTS:
                self._fail(rid, BUSY, f"more than {MAX_QUEUED_EVENTS} events are queued on this "
                                      f"connection; wait for replies", done=True)
                return
            now = time.monotonic()
            self.queue.extend(Item(rid, request, seq, now) for seq in range(len(request.events)))
        elif isinstance(request, Release):
            bad = self.pool.release(request.slots) if self.pool else list(request.slots)
            if bad:
                self._fail(rid, BAD_SLOT, f"slots {bad} are not held by this connection")
        elif isinstance(request, Info):
            self._info(rid, request)
        elif isinstance(request, Ping):
            self._reply(ok_reply(rid, pong=True))
        elif isinstance(request, Stats):
            self._reply(ok_reply(rid, stats=self.ctx.stats()))
        elif isinstance(request, Shutdown):
            self._shutdown(rid, request)

    def _authorized(self, token: Optional[str]) -> bool:
        expected = self.ctx.token
        if expected is None:
            return True
        # bytes: compare_digest refuses str with non-ASCII characters; surrogatepass
        # because JSON can carry a lone surrogate, which strict UTF-8 cannot encode
        return token is not None and hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                                         expected.encode())

    def _hello(self, rid: int, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            self._fail(rid, VERSION, f"protocol version {hello.version} is not supported; "
                                     f"this server speaks {PROTOCOL_VERSION}")
            return
        if not self._authorized(hello.token):
            self._fail(rid, UNAUTHORIZED, "a valid token is required")
            self.finish()
            return
        if self.hello is not None:
            self._fail(rid, NOT_READY, "hello was already received")
            return
        self.hello = hello
        self.window = min(hello.window or self.ctx.window, self.ctx.max_window)
        self.inline = not (hello.transport == "shm" and self.local
                           and hello.host == self.ctx.hostname)
        if not self.inline:
            self.pool = SlotPool(self.ctx.allocator, self.window)
        self._reply(ok_reply(rid, version=PROTOCOL_VERSION, transport="inline" if self.inline
                             else "shm", window=self.window, source=self.ctx.source,
                             worker=os.getpid()))

    def _info(self, rid: int, request: Info) -> None:
        try:
            self._reply(ok_reply(rid, **self.ctx.reader.info(request)))
        except ProtocolError as e:
            self._fail(rid, e.code, e.message)

    def _shutdown(self, rid: int, request: Shutdown) -> None:
        if not self._authorized(request.token):
            self._fail(rid, UNAUTHORIZED, "shutdown needs the server's token")
            return
        self._reply(ok_reply(rid, stopping=True))
        self.ctx.shutdown()

    # -- work -----------------------------------------------------------------------
    def next_arrival(self) -> float:
        return self.queue[0].arrived

    def has_work(self) -> bool:
        if not self.queue or self.closed:
            return False
        if self.inline:
            return self.inline_pending < self.window
        return self.pool.has_capacity()

    def work(self) -> None:
        item = self.queue.popleft()
        event = item.get.events[item.seq]
        done = item.seq == len(item.get.events) - 1
        slot = None

        def allocate(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            nonlocal slot
            if self.inline:
                return np.empty(shape, dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            slot = self.pool.acquire(nbytes)
            return slot.segment.array(shape, dtype)

        try:
            data, meta = self.ctx.reader.read(item.get, event, allocate)
        except BudgetExhausted as e:
            if self.retry_later():
                self.queue.appendleft(item)
                return
            self._fail(item.rid, e.code, e.message, seq=item.seq, event=event, done=done)
            return
        except ProtocolError as e:
            if slot is not None:
                self.pool.release([slot.id])
            if e.code in REQUEST_ERRORS:
                self._drop(item.rid)
                done = True
            self._fail(item.rid, e.code, e.message, seq=item.seq, event=event, done=done)
            return
        self.memory_found()
        desc = ok_reply(item.rid, seq=item.seq, event=event, shape=list(data.shape),
                        dtype=data.dtype.str, timestamp=meta.timestamp,
                        calibrated=meta.calibrated, done=done, **meta.extra)
        if slot is not None:
            desc.update(slot=slot.id, name=slot.segment.name, size=slot.segment.size)
            self._reply(desc)
        else:
            desc["nbytes"] = data.nbytes
            self.inline_pending += 1
            self.send(encode_frame(desc), memoryview(data.reshape(-1)).cast("B"), self._inline_sent)

    def _inline_sent(self) -> None:
        self.inline_pending -= 1

    def _drop(self, rid: int) -> None:
        self.queue = deque(i for i in self.queue if i.rid != rid)

    # -- output ---------------------------------------------------------------------
    def _reply(self, header: Dict[str, Any]) -> None:
        self.send(encode_frame(header))

    def _fail(self, rid: int, code: str, message: str, **fields: Any) -> None:
        self.ctx.reader.state.count_error(self.ctx.reader.slot, code)
        self._reply(error_reply(rid, code, message, **fields))

    def release(self) -> None:
        self.queue.clear()
        if self.pool is not None:
            self.pool.close()

