"""The v1 dialect on one persistent connection.

Requests are handled in arrival order and may be pipelined (a batch buffer
with room is answered at once: `_make_buffer`). A `get` becomes
one work item per event; the worker's loop runs one item at a time across
all its connections, so a long `get` does not starve other clients. Each
event gets its own reply (with `seq`); the last reply of a request carries
`done: true`. Where each frame goes is decided once, when its memory is
reserved (placement.py): an extent of the pool of its own or a frame-cache
entry for a local client, private memory sent inline otherwise, or its
place in a batch buffer of the group (`into`), which is answered once,
when the get's last frame is there. At most `window` frames are held by
the client at once (released, or sent inline), which is the back-pressure
a slow client feels.

Everything the connection holds is given back when it closes, whatever
the client did or did not release: reservations, pins of cache entries
(also of entries being sent inline), its claims on batch buffers. What was
handed to the client stays held by the client's own holds (pool_pages.py)
until it lets go.
"""
import hmac
import logging
import math
import os
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.errors import (BAD_ARENA, BAD_SLOT, BUSY, HEADER_TOO_LARGE, NO_DATA,
                                       NO_MEMORY, NOT_FOUND, NOT_READY, UNAUTHORIZED,
                                       UNKNOWN_DETECTOR, UNKNOWN_SOURCE, VERSION, ProtocolError)
from psana_ipc.protocol.framing import FrameDecoder, encode_frame
from psana_ipc.protocol.messages import (Follow, FreeArenas, Get, Hello, Info, MakeArena, Ping,
                                         Prefetch, Release, Shutdown, Stats, parse_request,
                                         request_id)
from psana_ipc.protocol.replies import (ArenaMade, ArenaWritten, ErrorReply, FrameDesc,
                                        FrameReply, InfoReply, Inline as InlineBytes, InPool,
                                        Pong, Queued, Reply, Skipped, StatsReply, Stopping,
                                        Welcome, WrittenFrame)

from . import cached_frames
from .cached_frames import ReadAhead, copy_entry
from .channel import Channel
from .context import WorkerContext, is_local_peer
from .frame_cache import PENDING, Entry
from .frame_memory import Extent
from .frame_reader import frame_desc
from .groups import group_is_ours, group_key, issue_group
from .live import follow_reply
from .placement import Cached, Inline, Item, Own, Place, Placement
from .pool_index import Grant, refusal
from .pool_pages import Held

log = logging.getLogger(__name__)
MAX_QUEUED_EVENTS = 8192       # events queued per connection before gets are refused
MAX_BEFORE_HELLO = 4096        # bytes buffered before a hello is complete
REQUEST_ERRORS = (NOT_FOUND, UNKNOWN_DETECTOR, UNKNOWN_SOURCE, BAD_ARENA)  # no use going on
KEEP_IDLE = 0.5       # seconds a connection with nothing queued keeps its released extents


class V1Connection(Channel):
    def __init__(self, sock, ctx: WorkerContext) -> None:
        super().__init__(sock)
        self.ctx = ctx
        self.memory = ctx.memory
        self.conn = ctx.next_connection()
        self.decoder = FrameDecoder()
        self.local = is_local_peer(sock)
        self.hello: Optional[Hello] = None
        self.group = 0
        self.inline = False
        self.window = ctx.window
        self.queue: Deque[Item] = deque()
        self.handed: Dict[int, Union[Extent, Entry]] = {}   # handle -> what the client holds
        self.sending: List[Placement] = []      # inline frames queued, given back once sent
        self.handles = 0
        self.written: Dict[int, List[WrittenFrame]] = {}   # per get into a batch buffer
        self.buffers: Dict[int, Extent] = {}     # batch buffers found, by ticket (checked at use)
        self.partial_since: Optional[float] = None   # a request begun but not complete
        self.drained_at = time.monotonic()      # when its queue last ran empty
        self.read_ahead_queue = ReadAhead(ctx.cache, ctx.reader)

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
                break
            self._handle(frame.header)
        if self.hello is None and self.decoder.buffered > MAX_BEFORE_HELLO:
            self._fail(-1, HEADER_TOO_LARGE, f"more than {MAX_BEFORE_HELLO} bytes before a "
                                             f"complete hello")
            self.finish()
        elif not self.decoder.buffered:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = time.monotonic()

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
            self.ctx.counters.request()
            if len(self.queue) + len(request.events) > MAX_QUEUED_EVENTS:
                self._fail(rid, BUSY, f"more than {MAX_QUEUED_EVENTS} events are queued on this "
                                      f"connection; wait for replies", True)
                return
            now = time.monotonic()
            self.queue.extend(Item(rid, request, seq, now) for seq in range(len(request.events)))
        elif isinstance(request, Prefetch):
            self._reply(Queued(rid, self.read_ahead_queue.hint(request.get())))
        elif isinstance(request, MakeArena):
            self._make_buffer(Item(rid, request, 0, time.monotonic()))
        elif isinstance(request, FreeArenas):
            self._free_arenas(rid, request.arenas)
        elif isinstance(request, Release):
            self._release(rid, request.handles)
        elif isinstance(request, Info):
            self._info(rid, request)
        elif isinstance(request, Ping):
            self._reply(Pong(rid))
        elif isinstance(request, Stats):
            self._reply(StatsReply(rid, self.ctx.stats()))
        elif isinstance(request, Shutdown):
            self._shutdown(rid, request)
        elif isinstance(request, Follow):
            self._reply(follow_reply(self.ctx.reader, rid, request))

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
        if hello.group is not None and not group_is_ours(hello.group):
            self._fail(rid, BAD_ARENA, "this connection group id was not issued by this server")
            return
        group = hello.group or issue_group()
        inline = not (hello.transport == "shm" and self.local and hello.host == self.ctx.hostname)
        if not inline:
            try:
                self.memory.connect(self.conn, group_key(group))
            except ProtocolError as e:
                self._fail(rid, e.code, e.message)
                return
        self.hello, self.group, self.inline = hello, group_key(group), inline
        self.window = min(hello.window or self.ctx.window, self.ctx.max_window)
        self._reply(Welcome(rid, PROTOCOL_VERSION, "inline" if inline else "shm", self.window,
                            self.ctx.source, os.getpid(), group, "" if inline else self.ctx.door,
                            self.ctx.workers))

    def _info(self, rid: int, request: Info) -> None:
        try:
            self._reply(InfoReply(rid, self.ctx.reader.info(request)))
        except ProtocolError as e:
            self._fail(rid, e.code, e.message)

    def _shutdown(self, rid: int, request: Shutdown) -> None:
        if not self._authorized(request.token):
            self._fail(rid, UNAUTHORIZED, "shutdown needs the server's token")
            return
        self._reply(Stopping(rid))
        self.ctx.shutdown(False)

    def _release(self, rid: int, handles: Tuple[int, ...]) -> None:
        bad, given = [], []
        for handle in handles:
            held = self.handed.pop(handle, None)
            if held is None:
                bad.append(handle)
            elif isinstance(held, Entry):
                self.ctx.cache.unpin(held)
            else:
                given.append(held)
        self.memory.release(self.conn, given, keep=self._keep_until(time.monotonic()) is not None)
        if bad:
            self._fail(rid, BAD_SLOT, f"frames {bad} are not held by this connection")

    def _free_arenas(self, rid: int, tickets: Tuple[int, ...]) -> None:
        bad = self.memory.free_batches(tickets, self.group) if not self.inline else list(tickets)
        if bad:
            self._fail(rid, BAD_ARENA, f"{bad} are not batch buffers of this connection's group")

    # -- work -----------------------------------------------------------------------
    def next_arrival(self) -> float:
        return self.queue[0].arrived

    def has_work(self) -> bool:
        if not self.queue or self.closed:
            return False
        return len(self.handed) + len(self.sending) < self.window

    def _frame_size(self, item: Item) -> int:
        if item.nbytes is None:
            nbytes = self.ctx.reader.frame_size(item.get, item.event)
            if nbytes is None:       # only a read tells: read once, keep it while waiting
                item.prefetched = self.ctx.reader.read_private(item.get, item.event)
                nbytes = item.prefetched[0].nbytes
            item.nbytes = nbytes
        return item.nbytes

    def reserve(self) -> Grant:
        return self._reserve_item(self.queue[0])

    def _reserve_item(self, item: Item) -> Grant:
        try:
            if isinstance(item.get, MakeArena):
                return self._reserve_buffer(item)
            if item.placement is None:
                return self._place(item)
            return Grant.GRANTED
        except ProtocolError as e:
            item.error = e          # `work` answers it
            return Grant.GRANTED

    def _place(self, item: Item) -> Grant:
        """Decide where the item's frame goes, reserving its memory."""
        place = None
        if item.get.into is not None:
            place = self._place_in_batch(item)
        if self.ctx.cache is not None and not item.bypass:
            found = cached_frames.find(self.ctx.cache, item.get, item.event,
                                       lambda: self._frame_size(item))
            if found is PENDING:
                return Grant.PENDING
            if found is not None:
                item.placement = Cached(self.ctx.cache, found, place)
                return Grant.GRANTED
            item.bypass = True
        if place is not None:
            item.placement = place
            return Grant.GRANTED
        grant, extent = self.memory.take(self.conn, self.group, self._frame_size(item))
        if extent is not None:
            item.placement = (Inline if self.inline else Own)(self.memory, extent)
        return grant

    def _place_in_batch(self, item: Item) -> Place:
        """The item's place in a batch buffer, checked before any read (its
        size against the source's)."""
        if self.inline:
            raise ProtocolError(BAD_ARENA, "batch buffers need shared memory with the server "
                                           "(transport shm, same host)")
        into = item.get.into
        buffer = self.buffers.get(into.arena)
        if buffer is None:
            buffer = self.buffers[into.arena] = self.memory.find_batch(into.arena, self.group)
        place = Place(self.memory, into, item.seq, buffer)
        known = self.ctx.reader.frame_size(item.get, item.event)
        if known is not None and known != place.nbytes:
            raise ProtocolError(BAD_ARENA, f"event {item.event} is {known} bytes in mode "
                                           f"{item.get.mode}; the batch buffer's frames are "
                                           f"{place.nbytes}")
        return place

    def _make_buffer(self, item: Item) -> None:
        """A batch buffer is answered at once when there is room for it: it is
        what the client's next batch waits for, and queued it would wait for
        every frame asked before it on this worker (a DataLoader worker's
        first batch of an epoch behind another's). Only one that must wait
        for memory is queued, and waits as frames do."""
        grant = self._reserve_item(item)
        if grant is Grant.GRANTED:
            self._answer_buffer(item)
        else:
            self.queue.append(item)

    def _answer_buffer(self, item: Item) -> None:
        if item.error is not None:
            self._failed(item, item.error)
        else:
            made = item.made
            self._reply(ArenaMade(item.rid, made.ticket, made.pool, made.offset, made.size))

    def _reserve_buffer(self, item: Item) -> Grant:
        if self.inline:
            raise ProtocolError(BAD_ARENA, "batch buffers need shared memory with the server "
                                           "(transport shm, same host)")
        item.nbytes = item.get.size
        grant, item.made = self.memory.batch(self.conn, self.group, item.get.size)
        if grant is Grant.TOO_LARGE or (grant is Grant.WAIT and not item.get.wait):
                raise ProtocolError(NO_MEMORY, refusal(grant, item.nbytes, self.memory.index.budget,
                                                   "a batch buffer"))
        return grant

    def _next(self) -> Item:
        """The queue's first item, taken off."""
        item = self.queue.popleft()
        if not self.queue:
            self.drained_at = time.monotonic()
        return item

    def _keep_until(self, now: float) -> Optional[float]:
        """Until when the extents its client released are kept for its next
        frames (FrameMemory.release): while it has frames queued, and for
        KEEP_IDLE after its queue ran empty, which spans a client's pause
        between batches. Memory another frame of this worker waits for goes
        sooner (FrameMemory); another worker's waits up to KEEP_IDLE."""
        if self.queue:
            return math.inf
        until = self.drained_at + KEEP_IDLE
        return until if now < until else None

    def refuse(self, grant: Grant) -> None:
        """The request's other events would wait as long: it ends here."""
        item = self._next()
        self._drop(item.rid)
        what = "a batch buffer" if isinstance(item.get, MakeArena) else "a frame"
        self._fail(item.rid, NO_MEMORY, refusal(grant, item.nbytes, self.memory.index.budget, what),
                   True, *item.where())

    def work(self) -> None:
        item = self._next()
        if isinstance(item.get, MakeArena):
            self._answer_buffer(item)
            return
        try:
            if item.error is not None:
                raise item.error
            if isinstance(item.placement, Cached):
                self._serve_cached(item, item.placement)
                return
            with item.placement.target() as (allocate, room):
                data, meta = self.ctx.reader.read(item.get, item.event, allocate, room,
                                                  item.prefetched)
        except Held:                # a client of an earlier use of that memory still reads it
            item.placement = None
            self.queue.appendleft(item)
            return
        except ProtocolError as e:
            self._failed(item, e)
            return
        self._deliver(item, item.placement, data, frame_desc(data, meta))

    def _serve_cached(self, item: Item, cached: Cached) -> None:
        entry, desc, kept = cached_frames.serve(self.ctx.cache, self.ctx.reader, item.get,
                                                item.event, cached.use, item.prefetched)
        if entry is None:           # not kept: served as without a cache
            item.prefetched, item.placement, item.bypass = kept, cached.place, True
            self.queue.appendleft(item)
            return
        cached.use = entry
        if cached.place is not None:
            try:
                with cached.place.target() as (allocate, _):
                    copy_entry(self.ctx.cache, entry, desc, allocate)
            finally:
                self.ctx.cache.unpin(entry)
            self._written(item, desc)
        elif self.inline:
            self._send(item, cached, desc, self.ctx.cache.frame(entry), entry.frame_bytes)
        else:
            self._hand(item, entry, desc)

    def _deliver(self, item: Item, placement: Placement, data: Any, desc: FrameDesc) -> None:
        if isinstance(placement, Place):
            self._written(item, desc)
        elif isinstance(placement, Inline):
            self._send(item, placement, desc, memoryview(data.reshape(-1)).cast("B"), data.nbytes)
        else:
            self._hand(item, placement.extent, desc)

    def _hand(self, item: Item, held: Union[Extent, Entry], desc: FrameDesc) -> None:
        """A frame in the pool, held by the client until it releases the handle."""
        self.handles += 1
        self.handed[self.handles] = held
        where = InPool(self.handles, held.pool, held.offset, held.size, held.ticket)
        self._reply(FrameReply(item.rid, item.seq, item.event, item.done, desc, where))

    def _send(self, item: Item, placement: Placement, desc: FrameDesc, payload: Any,
              nbytes: int) -> None:
        """A frame sent inline; what it holds is given back once it is sent (or
        the connection closes)."""
        self.sending.append(placement)
        self._reply(FrameReply(item.rid, item.seq, item.event, item.done, desc,
                               InlineBytes(nbytes)), payload, lambda: self._sent(placement))

    def _sent(self, placement: Placement) -> None:
        self.sending.remove(placement)
        placement.undo()

    def _failed(self, item: Item, e: ProtocolError) -> None:
        if item.placement is not None:
            item.placement.undo()
        done = item.done
        if e.code == NO_DATA and item.get.skip_incomplete:
            self._reply(Skipped(item.rid, item.seq, item.event, e.message, done))
            return
        if e.code in REQUEST_ERRORS:
            self._drop(item.rid)
            done = True
        if done:
            self.written.pop(item.rid, None)
        self._fail(item.rid, e.code, e.message, done, *item.where())

    def _written(self, item: Item, desc: FrameDesc) -> None:
        """Frames written into a batch buffer are told in one reply per request,
        once its last frame is there: the client waits for the batch, not for
        each frame."""
        written = self.written.setdefault(item.rid, [])
        written.append(WrittenFrame(item.seq, item.event, desc))
        if item.done:
            del self.written[item.rid]
            self._reply(ArenaWritten(item.rid, item.get.into.arena, tuple(written)))

    def wants_read_ahead(self) -> bool:
        return self.read_ahead_queue.waiting() and not self.closed

    def read_ahead(self) -> None:
        self.read_ahead_queue.read_one()

    def _holds_nothing(self) -> bool:
        return not (self.queue or self.out or self.handed or self.sending)

    def expendable_since(self) -> Optional[float]:
        if self.hello is None:
            return self.opened_at
        if self.partial_since is not None:
            return self.partial_since
        return self.last_activity if self._holds_nothing() else None

    def tick(self, now: float) -> Optional[float]:
        """Deadlines: hello, and every request once begun, complete within
        `first_request_within`; holding nothing, a request at least every
        --idle-timeout; kept extents given back in time (`_keep_until`)."""
        keep_until = None
        if self.memory.keeps(self.conn):
            keep_until = self._keep_until(now)
            if keep_until is None:
                self.memory.drop_kept(self.conn)
        since = self.expendable_since()
        if since is None:
            return keep_until if keep_until != math.inf else None
        idle = self.hello is not None and self.partial_since is None
        deadline = since + (self.ctx.idle_timeout if idle else self.ctx.first_request_within)
        if now >= deadline:
            self.close()
            return None
        return min(deadline, keep_until or deadline)

    def _drop(self, rid: int) -> None:
        for item in self.queue:
            if item.rid == rid and item.placement is not None:
                item.placement.undo()
        self.queue = deque(i for i in self.queue if i.rid != rid)

    # -- output ---------------------------------------------------------------------
    def _reply(self, reply: Reply, *after: Any) -> None:
        self.send(encode_frame(reply.to_header()), *after)

    def _fail(self, rid: int, code: str, message: str, done: Optional[bool] = None,
              seq: Optional[int] = None, event: Optional[int] = None) -> None:
        self.ctx.counters.error(code)
        self._reply(ErrorReply(rid, code, message, done, seq, event))

    def release(self) -> None:
        """Give back everything (see the module docstring)."""
        for placement in [i.placement for i in self.queue if i.placement is not None] \
                + self.sending:
            placement.undo()
        self.queue.clear()
        self.sending.clear()
        self.read_ahead_queue.clear()
        for held in self.handed.values():
            if isinstance(held, Entry):
                self.ctx.cache.unpin(held)
        self.handed.clear()
        if self.hello is not None:
            self.memory.disconnect(self.conn, self.group)
