"""One v1 connection's use of the frame cache: serve hits, fill misses,
keep the entries handed to the client pinned, and read ahead what the
client said comes next.

A hit never calls the source. A miss reserves an extent of the frame's size
(the cache's own bound) and the source writes the frame straight into it;
either way the client then maps the entry read-only, and it stays pinned
until released or the connection closes. When the cache has no room
(everything pinned), the frame goes through the connection's slots as
without a cache. While another worker is writing the same frame, the
request waits for it (`Grant.PENDING`) instead of reading it twice.
"""
import dataclasses
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.messages import Get
from psana_ipc.protocol.replies import FrameDesc

from .frame_cache import PENDING, Entry, Fill, WorkerCache
from .frame_reader import Frame, FrameReader, frame_desc
from .shared_state import Grant
from .sources.base import Allocator

log = logging.getLogger(__name__)
MAX_AHEAD = 8192            # events a connection may have hinted and not read ahead yet


class Bypass:
    """The cache had no room for this frame: it goes through a slot."""


BYPASS = Bypass()
CacheUse = Union[Entry, Fill, Bypass, None]


@dataclass
class CacheRead:
    """One event served through the cache, as `CachedFrames` sees it: the
    legacy dialect's request (a v1 item carries the same fields)."""
    get: Get
    event: int
    cache_use: CacheUse = None
    prefetched: Optional[Frame] = None


class CachedFrames:
    def __init__(self, cache: Optional[WorkerCache], reader: FrameReader) -> None:
        self.cache = cache
        self.reader = reader
        self.held: Dict[int, Entry] = {}            # handle -> entry pinned for the client
        self.ahead: Deque[Tuple[Get, int]] = deque()

    @property
    def pinned(self) -> int:
        return len(self.held)

    # -- client reads -----------------------------------------------------------------------
    def reserve(self, item: Any, frame_size: Callable[[], int]) -> Optional[Grant]:
        """Find or reserve the item's entry; None: serve it without the cache."""
        if self.cache is None or item.cache_use is BYPASS:
            return None
        key = self.cache.key(item.get, item.event)
        found = self.cache.lookup(key)
        if found is None:
            found = self.cache.claim(key, frame_size())
        if found is PENDING:
            return Grant.PENDING
        if found is None:
            item.cache_use = BYPASS
            return None
        item.cache_use = found
        return Grant.GRANTED

    @staticmethod
    def serves(item: Any) -> bool:
        """The item's frame comes from (or goes into) the cache."""
        return isinstance(item.cache_use, (Entry, Fill))

    def serve(self, item: Any) -> Optional[Tuple[Entry, FrameDesc]]:
        """The item's pinned entry and its descriptor, written first on a miss.
        None if the frame, once read, cannot be kept (its descriptor is longer
        than the room left for it, or the disk refused it): the item then
        keeps a private copy and goes through a slot, as without a cache."""
        use = item.cache_use
        if isinstance(use, Entry):
            desc = FrameDesc.from_fields(self.cache.fields(use))
            if item.get.fields:      # values of other detectors are read, never cached
                values = self.reader.values(item.get, item.event)
                desc = dataclasses.replace(desc, extra=dict(desc.extra, values=values))
            item.cache_use = None
            return use, desc
        item.cache_use = None
        try:
            data, meta = self.reader.read(item.get, item.event, use.array, use.capacity,
                                          item.prefetched)
        except BaseException:
            self.cache.abandon(use)
            raise
        desc = frame_desc(data, meta)
        entry = self.cache.commit(use, _stored(desc), data.nbytes, pin=True)
        if entry is None:
            item.prefetched, item.cache_use = (data.copy(), meta), BYPASS
            del data
            self.cache.abandon(use)
            return None
        return entry, desc

    def copy_into(self, entry: Entry, desc: FrameDesc, place: Allocator) -> None:
        """The entry's frame copied into `place`, its spot in a batch arena
        (which checks the shape and dtype before anything is written)."""
        dtype = np.dtype(desc.dtype)
        target = place(desc.shape, dtype)
        if entry.frame_bytes:
            np.copyto(target, np.frombuffer(self.payload(entry), dtype).reshape(desc.shape))

    def hand_over(self, handle: int, entry: Entry) -> None:
        self.held[handle] = entry

    def unpin(self, handle: int) -> bool:
        """Release an entry handed to the client; False if `handle` is not one."""
        entry = self.held.pop(handle, None)
        if entry is None:
            return False
        self.cache.unpin(entry)
        return True

    def release(self, entry: Entry) -> None:
        self.cache.unpin(entry)

    def payload(self, entry: Entry) -> memoryview:
        """The entry's frame bytes, read-only (an inline reply sends them)."""
        return self.cache.frame(entry)

    def forget(self, item: Any) -> None:
        """An item that will not be served: give back what it reserved."""
        use, item.cache_use = item.cache_use, None
        if isinstance(use, Entry):
            self.cache.unpin(use)
        elif isinstance(use, Fill):
            self.cache.abandon(use)

    def close(self) -> None:
        for entry in self.held.values():
            self.cache.unpin(entry)
        self.held.clear()
        self.ahead.clear()

    # -- read-ahead -------------------------------------------------------------------------
    def hint(self, get: Get) -> int:
        """Queue a client's hint; returns how many events were queued."""
        if self.cache is None:
            return 0
        self.ahead.extend((get, e) for e in get.events)
        while len(self.ahead) > MAX_AHEAD:
            self.ahead.popleft()
        return len(get.events)

    def has_ahead(self) -> bool:
        return bool(self.ahead)

    def read_ahead_one(self) -> None:
        """Read the next hinted frame into the cache unless it is there; a cache
        with no room left for read-ahead ends this connection's hints."""
        get, event = self.ahead.popleft()
        key = self.cache.key(get, event)
        if self.cache.lookup(key, pin=False) is not None:
            return
        try:
            nbytes = self.reader.frame_size(get, event)
        except ProtocolError as e:
            log.debug("read-ahead of event %d skipped: %s", event, e.message)
            return
        if nbytes is None:
            return              # only a read tells the size: not worth it ahead of time
        fill = self.cache.claim(key, nbytes, read_ahead=True)
        if fill is None:
            self.ahead.clear()
            return
        if not isinstance(fill, Fill):
            return
        try:
            data, meta = self.reader.read(get, event, fill.array, fill.capacity)
        except ProtocolError as e:
            self.cache.abandon(fill)
            log.debug("read-ahead of event %d failed: %s", event, e.message)
            return
        if self.cache.commit(fill, _stored(frame_desc(data, meta)), data.nbytes,
                             pin=False) is None:
            self.cache.abandon(fill)


def _stored(desc: FrameDesc) -> Dict[str, Any]:
    """A frame's descriptor as its entry keeps it: without the values of
    other detectors, which are read for every request."""
    fields = desc.to_fields()
    fields.pop("values", None)
    return fields
