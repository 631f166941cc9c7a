"""A request's use of the frame cache, for both dialects: find or claim a
frame's entry, serve it (reading it into the entry first on a miss), and
read ahead what a client said comes next.

A hit never calls the source. A miss reserves an entry of the frame's size
and the source writes the frame straight into it. While another worker is
writing the same frame, the request waits for it (`Grant.PENDING`)
instead of reading it twice. When the cache has no room (everything
pinned), the frame is served as without a cache.
"""
import dataclasses
import logging
from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.messages import Get
from psana_ipc.protocol.replies import FrameDesc

from .frame_cache import Entry, Fill, FrameCache, Pending
from .frame_reader import Frame, FrameReader, frame_desc
from .pool_pages import Held
from .sources.base import Allocator

log = logging.getLogger(__name__)
MAX_AHEAD = 8192            # events a connection may have hinted and not read ahead yet


def find(cache: FrameCache, get: Get, event: int,
         frame_size: Callable[[], int]) -> Union[Entry, Fill, Pending, None]:
    """The event's entry (pinned), a fill to write it into, PENDING while
    another worker writes it, or None: serve it without the cache."""
    key = cache.key(get, event)
    found = cache.lookup(key)
    return cache.claim(key, frame_size()) if found is None else found


def serve(cache: FrameCache, reader: FrameReader, get: Get, event: int,
          use: Union[Entry, Fill], prefetched: Optional[Frame] = None
          ) -> Tuple[Optional[Entry], FrameDesc, Optional[Frame]]:
    """The entry (pinned) and its descriptor, written first on a miss. The
    entry is None if the frame, once read, cannot be kept (its descriptor is
    longer than the room left for it, or the disk refused it): the frame is
    then returned as a private copy, to serve as without a cache."""
    if isinstance(use, Entry):
        desc = FrameDesc.from_fields(cache.fields(use))
        if get.fields:          # values of other detectors are read, never cached
            desc = dataclasses.replace(desc, extra=dict(desc.extra,
                                                        values=reader.values(get, event)))
        return use, desc, None
    try:
        with cache.writing(use) as allocate:
            data, meta = reader.read(get, event, allocate, use.capacity, prefetched)
            desc = frame_desc(data, meta)
            entry = cache.commit(use, _stored(desc), data.nbytes, pin=True)
            kept = None if entry is not None else (data.copy(), meta)
    except BaseException:
        cache.abandon(use)
        raise
    if entry is None:
        cache.abandon(use)
    return entry, desc, kept


def copy_entry(cache: FrameCache, entry: Entry, desc: FrameDesc, allocate: Allocator) -> None:
    """A cached frame copied into memory `allocate` gives (which checks the
    shape and dtype before anything is written)."""
    dtype = np.dtype(desc.dtype)
    target = allocate(desc.shape, dtype)
    if entry.frame_bytes:
        np.copyto(target, np.frombuffer(cache.frame(entry), dtype).reshape(desc.shape))


def _stored(desc: FrameDesc) -> Dict:
    """A frame's descriptor as its entry keeps it: without the values of
    other detectors, which are read for every request."""
    fields = desc.to_fields()
    fields.pop("values", None)
    return fields


class ReadAhead:
    """The events a connection said come next (`prefetch`), read into the
    cache one at a time while the worker has nothing else to do."""

    def __init__(self, cache: Optional[FrameCache], reader: FrameReader) -> None:
        self.cache = cache
        self.reader = reader
        self.ahead: Deque[Tuple[Get, int]] = deque()

    def hint(self, get: Get) -> int:
        """Queue a client's hint; returns how many events were queued."""
        if self.cache is None:
            return 0
        self.ahead.extend((get, e) for e in get.events)
        while len(self.ahead) > MAX_AHEAD:
            self.ahead.popleft()
        return len(get.events)

    def waiting(self) -> bool:
        return bool(self.ahead)

    def clear(self) -> None:
        self.ahead.clear()

    def read_one(self) -> None:
        """Read the next hinted frame into the cache unless it is there; a cache
        with no room left for read-ahead ends this connection's hints."""
        get, event = self.ahead.popleft()
        cache = self.cache
        key = cache.key(get, event)
        if cache.lookup(key, pin=False) is not None:
            return
        try:
            nbytes = self.reader.frame_size(get, event)
        except ProtocolError as e:
            log.debug("read-ahead of event %d skipped: %s", event, e.message)
            return
        if nbytes is None:
            return              # only a read tells the size: not worth it ahead of time
        fill = cache.claim(key, nbytes, read_ahead=True)
        if fill is None:
            self.ahead.clear()
            return
        if not isinstance(fill, Fill):
            return
        try:
            with cache.writing(fill) as allocate:
                data, meta = self.reader.read(get, event, allocate, fill.capacity)
                kept = cache.commit(fill, _stored(frame_desc(data, meta)), data.nbytes,
                                    pin=False)
        except (ProtocolError, Held) as e:
            cache.abandon(fill)
            log.debug("read-ahead of event %d failed: %s", event, e)
            return
        if kept is None:
            cache.abandon(fill)

