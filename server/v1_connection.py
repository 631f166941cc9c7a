"""The v1 dialect on one persistent connection.

Requests are handled in arrival order and may be pipelined. A `get` becomes
one work item per event; the worker's loop runs one item at a time across
all its connections, so a long `get` does not starve other clients. Each
event gets its own reply (with `seq`); the last reply of a request carries
`done: true`. Frames go into slots of this connection's pool (shared memory)
or inline after the header; either way at most `window` frames are
outstanding, which is the back-pressure a slow client feels, and every
frame's bytes are reserved from the budget before it is read (inline ones
until they are sent). A get into a batch arena (server/arenas.py) writes
each frame at the place the request names and is answered once, when its
last frame is there, with the list of its frames.
"""
import hmac
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.errors import (BAD_ARENA, BAD_SLOT, BUSY, HEADER_TOO_LARGE, NO_DATA,
                                       NO_MEMORY, NOT_FOUND, NOT_READY, UNAUTHORIZED,
                                       UNKNOWN_DETECTOR, UNKNOWN_SOURCE, VERSION, ProtocolError)
from psana_ipc.protocol.framing import FrameDecoder, encode_frame
from psana_ipc.protocol.messages import (AdoptArena, Follow, FreeArenas, Get, Hello, Info,
                                         MakeArena, Ping, Prefetch, Release, Shutdown, Stats,
                                         parse_request, request_id)
from psana_ipc.protocol.replies import (ArenaMade, ArenaWritten, ErrorReply, FrameDesc,
                                        FrameReply, InfoReply, Pong, Queued, Reply, Skipped,
                                        StatsReply, Stopping, Welcome, WrittenFrame, encode_reply)

from .arenas import Arenas, group_is_ours, issue_group
from .channel import Channel
from .context import WorkerContext, is_local_peer
from .cached_frames import CacheUse, CachedFrames
from .frame_cache import Entry
from .frame_reader import Frame, frame_desc
from .live import follow_reply
from .shared_state import Grant
from .slots import Holding, Slot, SlotPool, refusal
from .sources.base import Allocator

log = logging.getLogger(__name__)
MAX_QUEUED_EVENTS = 8192       # events queued per connection before gets are refused
MAX_BEFORE_HELLO = 4096        # bytes buffered before a hello is complete
REQUEST_ERRORS = (NOT_FOUND, UNKNOWN_DETECTOR, UNKNOWN_SOURCE, BAD_ARENA)  # no use going on


@dataclass
class Item:
    """One event of a get (or one arena to make), and the memory reserved for it."""
    rid: int
    get: Union[Get, MakeArena]
    seq: int
    arrived: float
    nbytes: Optional[int] = None          # the frame's size, once known
    prefetched: Optional[Frame] = None    # read ahead: its size was not known before
    slot: Optional[Slot] = None           # shm: the slot reserved for it
    reserved: int = 0                     # inline: the bytes reserved for it
    cache_use: CacheUse = None            # its frame-cache entry (see `CachedFrames`)
    place: Optional[Allocator] = None     # its place in a batch arena
    error: Optional[ProtocolError] = None

    @property
    def event(self) -> int:
        return self.get.events[self.seq]

    @property
    def done(self) -> bool:
        return isinstance(self.get, MakeArena) or self.seq == len(self.get.events) - 1

    def where(self) -> Tuple[Optional[int], Optional[int]]:
        """The seq and event a reply about this item names (none for an arena)."""
        return (None, None) if isinstance(self.get, MakeArena) else (self.seq, self.event)


class V1Connection(Channel):
    def __init__(self, sock, ctx: WorkerContext) -> None:
        super().__init__(sock)
        self.ctx = ctx
        self.decoder = FrameDecoder()
        self.local = is_local_peer(sock)
        self.hello: Optional[Hello] = None
        self.pool: Optional[SlotPool] = None
        self.arenas: Optional[Arenas] = None     # batch arenas: shm connections only
        self.written: Dict[int, List[WrittenFrame]] = {}   # per get into an arena: so far
        self.inline = False
        self.window = ctx.window
        self.queue: Deque[Item] = deque()
        self.inline_pending = 0
        self.holding = Holding(ctx.budget)      # inline frames not sent yet
        self.partial_since: Optional[float] = None   # a request begun but not complete
        self.cached = CachedFrames(ctx.cache, ctx.reader)

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
            self._reply(Queued(rid, self.cached.hint(request.get())))
        elif isinstance(request, MakeArena):
            self.queue.append(Item(rid, request, 0, time.monotonic()))
        elif isinstance(request, FreeArenas):
            bad = self.arenas.free(request.names) if self.arenas else list(request.names)
            if bad:
                self._fail(rid, BAD_ARENA, f"arenas {bad} were not made by this connection")
        elif isinstance(request, AdoptArena):
            self._adopt_arena(rid, request)
        elif isinstance(request, Release):
            bad = self.pool.release(request.slots) if self.pool else list(request.slots)
            bad = [sid for sid in bad if not self.cached.unpin(sid)]
            if bad:
                self._fail(rid, BAD_SLOT, f"slots {bad} are not held by this connection")
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
        self.hello = hello
        self.window = min(hello.window or self.ctx.window, self.ctx.max_window)
        self.inline = not (hello.transport == "shm" and self.local
                           and hello.host == self.ctx.hostname)
        if not self.inline:
            self.pool = SlotPool(self.ctx.budget, self.window)
            self.arenas = Arenas(self.pool.holding, group)
        self._reply(Welcome(rid, PROTOCOL_VERSION, "inline" if self.inline else "shm",
                            self.window, self.ctx.source, os.getpid(), group))

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
        self.ctx.shutdown()

    # -- work -----------------------------------------------------------------------
    def next_arrival(self) -> float:
        return self.queue[0].arrived

    def has_work(self) -> bool:
        if not self.queue or self.closed:
            return False
        if self.inline:
            return self.inline_pending < self.window
        return self.pool.busy_count + self.cached.pinned < self.window

    def _frame_size(self, item: Item) -> int:
        if item.nbytes is None:
            nbytes = self.ctx.reader.frame_size(item.get, item.event)
            if nbytes is None:       # only a read tells: read once, keep it while waiting
                item.prefetched = self.ctx.reader.read_private(item.get, item.event)
                nbytes = item.prefetched[0].nbytes
            item.nbytes = nbytes
        return item.nbytes

    def reserve(self) -> Grant:
        item = self.queue[0]
        try:
            if isinstance(item.get, MakeArena):
                return self._reserve_arena(item)
            if item.get.into is not None and item.place is None:
                self._reserve_arena(item)
            grant = self.cached.reserve(item, lambda: self._frame_size(item))
            if grant is not None:
                return grant
            if item.place is not None:
                return Grant.GRANTED
            nbytes = self._frame_size(item)
            if self.inline:
                if nbytes > self.ctx.budget.limit:
                    return Grant.TOO_LARGE
                grant = self.holding.take(nbytes)
                if grant is Grant.GRANTED:
                    item.reserved = nbytes
                return grant
            grant, item.slot = self.pool.reserve(nbytes)
            return grant
        except ProtocolError as e:
            item.error = e          # `work` answers it
            return Grant.GRANTED

    def _reserve_arena(self, item: Item) -> Grant:
        """An arena to make: its bytes from the budget. A frame into an arena:
        nothing to reserve, only its place to check (before any read, its size
        against the source's)."""
        arenas = self._arenas()
        if isinstance(item.get, MakeArena):
            item.nbytes = item.get.size
            return arenas.reserve(item.nbytes, item.get.wait)
        item.place, item.reserved = arenas.allocator(item.get.into, item.seq)
        known = self.ctx.reader.frame_size(item.get, item.event)
        if known is not None and known != item.reserved:
            raise ProtocolError(BAD_ARENA, f"event {item.event} is {known} bytes in mode "
                                           f"{item.get.mode}; the arena's frames are "
                                           f"{item.reserved}")
        return Grant.GRANTED

    def _arenas(self) -> Arenas:
        if self.arenas is None:
            raise ProtocolError(BAD_ARENA, "batch arenas need shared memory with the server "
                                           "(transport shm, same host)")
        return self.arenas

    def refuse(self, grant: Grant) -> None:
        """The request's other events would wait as long: it ends here."""
        item = self.queue.popleft()
        self._drop(item.rid)
        what = "an arena" if isinstance(item.get, MakeArena) else "a frame"
        self._fail(item.rid, NO_MEMORY, refusal(grant, item.nbytes, self.ctx.budget.limit, what),
                   True, *item.where())

    def _make_arena(self, item: Item) -> None:
        try:
            segment = self.arenas.make(item.nbytes)
        except ProtocolError as e:
            self._fail(item.rid, e.code, e.message)
            return
        self._reply(ArenaMade(item.rid, segment.name, segment.size))

    def _adopt_arena(self, rid: int, request: AdoptArena) -> None:
        try:
            segment = self._arenas().adopt(request.name)
        except ProtocolError as e:
            self._fail(rid, e.code, e.message)
            return
        self._reply(ArenaMade(rid, segment.name, segment.size))

    def work(self) -> None:
        item = self.queue.popleft()
        if item.error is None and isinstance(item.get, MakeArena):
            self._make_arena(item)
            return
        try:
            if item.error is not None:
                raise item.error
            if self.cached.serves(item):
                served = self.cached.serve(item)
                if served is None:              # not kept: served as without a cache
                    self.queue.appendleft(item)
                elif item.place is not None:
                    self._copy_cached(item, *served)
                else:
                    self._send_cached(item, *served)
                return
            if item.place is not None:
                into, reserved = item.place, item.reserved
            elif item.slot is not None:
                into, reserved = item.slot.segment.array, item.slot.segment.size
            else:
                into, reserved = np.empty, item.reserved
            data, meta = self.ctx.reader.read(item.get, item.event, into, reserved,
                                              item.prefetched)
        except ProtocolError as e:
            if item.slot is not None:
                self.pool.release([item.slot.id])
            if item.reserved and item.place is None:
                self.holding.give(item.reserved)
            self.cached.forget(item)
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
            return
        desc = frame_desc(data, meta)
        if item.place is not None:
            self._written(item, desc)
        elif item.slot is not None:
            self._reply(FrameReply(item.rid, item.seq, item.event, item.done, desc,
                                   slot=item.slot.id, name=item.slot.segment.name,
                                   size=item.slot.segment.size))
        else:
            self.inline_pending += 1
            self._reply(FrameReply(item.rid, item.seq, item.event, item.done, desc,
                                   nbytes=data.nbytes),
                        memoryview(data.reshape(-1)).cast("B"),
                        lambda: self._inline_sent(item.reserved))

    def _send_cached(self, item: Item, entry: Entry, desc: FrameDesc) -> None:
        """A frame in the frame cache: shm clients map the entry itself, pinned
        until released; inline ones get its bytes, pinned until sent."""
        if self.inline:
            self.inline_pending += 1
            self._reply(FrameReply(item.rid, item.seq, item.event, item.done, desc,
                                   nbytes=entry.frame_bytes),
                        self.cached.payload(entry), lambda: self._cached_sent(entry))
        else:
            handle = self.pool.new_id()
            self.cached.hand_over(handle, entry)
            self._reply(FrameReply(item.rid, item.seq, item.event, item.done, desc, slot=handle,
                                   name=entry.name, size=entry.frame_bytes, cached=True,
                                   offset=entry.offset, path=entry.path))

    def _copy_cached(self, item: Item, entry: Entry, desc: FrameDesc) -> None:
        """A frame into an arena through the frame cache (read into a new entry
        on a miss): copied from the entry, which is unpinned at once."""
        try:
            self.cached.copy_into(entry, desc, item.place)
        finally:
            self.cached.release(entry)
        self._written(item, desc)

    def _cached_sent(self, entry: Entry) -> None:
        self.inline_pending -= 1
        self.cached.release(entry)

    def _written(self, item: Item, desc: FrameDesc) -> None:
        """Frames written into an arena are told in one reply per request, once
        its last frame is there: the client waits for the batch, not for each
        frame."""
        written = self.written.setdefault(item.rid, [])
        written.append(WrittenFrame(item.seq, item.event, desc))
        if item.done:
            del self.written[item.rid]
            self._reply(ArenaWritten(item.rid, item.get.into.arena, tuple(written)))

    def _inline_sent(self, reserved: int) -> None:
        self.inline_pending -= 1
        self.holding.give(reserved)

    def wants_read_ahead(self) -> bool:
        return self.cached.has_ahead() and not self.closed

    def read_ahead(self) -> None:
        self.cached.read_ahead_one()

    def trim(self, everything: bool) -> int:
        return self.pool.trim(everything) if self.pool is not None else 0

    def _holds_nothing(self) -> bool:
        return not (self.queue or self.out or self.inline_pending or self.cached.pinned
                    or (self.pool is not None and self.pool.busy_count)
                    or (self.arenas is not None and self.arenas.made))

    def expendable_since(self) -> Optional[float]:
        if self.hello is None:
            return self.opened_at
        if self.partial_since is not None:
            return self.partial_since
        return self.last_activity if self._holds_nothing() else None

    def tick(self, now: float) -> Optional[float]:
        """Deadlines: hello, and every request once begun, complete within
        `first_request_within`; holding nothing, a request at least every
        --idle-timeout."""
        since = self.expendable_since()
        if since is None:
            return None
        idle = self.hello is not None and self.partial_since is None
        deadline = since + (self.ctx.idle_timeout if idle else self.ctx.first_request_within)
        if now >= deadline:
            self.close()
            return None
        return deadline

    def _drop(self, rid: int) -> None:
        self.queue = deque(i for i in self.queue if i.rid != rid)

    # -- output ---------------------------------------------------------------------
    def _reply(self, reply: Reply, *after: Any) -> None:
        """Send a reply; it tells the client which slots were retired since the
        last one, so the client drops their mappings."""
        retired: List[int] = []
        if self.pool is not None and self.pool.retired:
            retired, self.pool.retired = self.pool.retired, []
        self.send(encode_frame(encode_reply(reply, retired)), *after)

    def _fail(self, rid: int, code: str, message: str, done: Optional[bool] = None,
              seq: Optional[int] = None, event: Optional[int] = None) -> None:
        self.ctx.counters.error(code)
        self._reply(ErrorReply(rid, code, message, done, seq, event))

    def release(self) -> None:
        for item in self.queue:
            self.cached.forget(item)
        self.queue.clear()
        self.cached.close()
        if self.arenas is not None:
            self.arenas.close()
        if self.pool is not None:
            self.pool.close()
        if self.holding.bytes:              # inline frames that were never sent
            self.holding.give(self.holding.bytes)
