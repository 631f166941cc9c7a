"""Where one frame goes, decided once when its memory is reserved.

A frame of a v1 get is placed in exactly one of these, each with where the
source writes it (`target`: an allocator and the bytes it may give), and
how it is given back when the frame will not be served (`undo`):

  Own     an extent of the pool of its own, handed to a local client, who
          holds it until it releases the reply's `handle`
  Inline  an extent of the pool of its own, sent from the pool's mapping
          after the reply (no copy but the kernel's into the socket) and
          given back once sent; no client maps it. Pool memory is pages
          taken ahead and reused, where private memory would be fresh pages
          faulted in for every frame
  Place   the frame's place in a batch buffer of the client's group (`into`)
  Cached  a frame-cache entry: found (a hit) or filled by the source first
          (a miss), then handed to a local client as it is, sent inline,
          or copied into its place in a batch buffer (`then`)

A request's events wait in their connection's queue as `Item`s, each with
its placement once its memory is reserved.

The legacy dialect places every frame in a fresh segment of its own
(legacy_connection.py), through the cache when there is one. What the
client is told of where its bytes are is one union, `protocol.replies.Where`.
"""
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import BAD_ARENA, ProtocolError
from psana_ipc.protocol.messages import Get, Into, MakeArena, frame_nbytes
from psana_ipc.protocol.pool import TICKET_BYTES

from .frame_cache import Entry, FrameCache, Fill
from .frame_memory import Extent, FrameMemory
from .frame_reader import Frame
from .pool_pages import Held
from .sources.base import Allocator

DTYPE_KINDS = "biufc"


@dataclass
class Own:
    memory: FrameMemory
    extent: Extent

    @contextmanager
    def target(self) -> Iterator[Tuple[Allocator, int]]:
        """Where the source writes, and how many bytes it may take."""
        mapping = self.memory.maps[self.extent.pool]
        try:
            with self.memory.writing(self.extent):
                yield (lambda shape, dtype: mapping.array(self.extent.offset, shape, dtype),
                       self.extent.size - TICKET_BYTES)
        except Held:
            self.memory.orphan(self.extent)
            raise

    def undo(self) -> None:
        self.memory.give(self.extent)


class Inline(Own):
    """An extent written as a local client's is, then sent (see the module docstring)."""


@dataclass
class Place:
    """Frame `seq` of a get into a batch buffer, its layout checked before
    any read (offset within the buffer and aligned, a plain numeric dtype)
    and its shape and dtype checked against the frame before any write."""
    memory: FrameMemory
    into: Into
    seq: int
    buffer: Extent          # the batch buffer `into` names (FrameMemory.find_batch)

    def __post_init__(self) -> None:
        self.dtype = _dtype(self.into.dtype)
        self.nbytes = frame_nbytes(self.into.shape, self.dtype.itemsize)
        self.start = self.into.offsets[self.seq]
        if self.start % self.dtype.itemsize:
            raise ProtocolError(BAD_ARENA, f"offset {self.start} is not aligned to the "
                                           f"{self.dtype.itemsize}-byte dtype {self.into.dtype}")

    @contextmanager
    def target(self) -> Iterator[Tuple[Allocator, int]]:
        with self.memory.writing_into(self.buffer, self.start, self.nbytes) as (mapping, offset):
            def place(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
                if (tuple(shape), np.dtype(dtype)) != (tuple(self.into.shape), self.dtype):
                    raise ProtocolError(BAD_ARENA, f"the frame is {np.dtype(dtype).str} "
                                                   f"{list(shape)}, the batch buffer was laid "
                                                   f"out for {self.into.dtype} "
                                                   f"{list(self.into.shape)}")
                return mapping.array(offset, shape, dtype)
            yield place, self.nbytes

    def undo(self) -> None:
        """Nothing was reserved: the buffer is the group's."""


@dataclass
class Cached:
    """A frame through the frame cache: `use` is the entry (pinned for this
    request) or the fill the source writes first; `place` where it is copied
    after, if the get is into a batch buffer."""
    cache: FrameCache
    use: Union[Entry, Fill]
    place: Optional[Place] = None

    @contextmanager
    def target(self) -> Iterator[Tuple[Allocator, int]]:
        """Where the source writes a fill."""
        with self.cache.writing(self.use) as allocate:
            yield allocate, self.use.capacity

    def undo(self) -> None:
        if isinstance(self.use, Entry):
            self.cache.unpin(self.use)
        else:
            self.cache.abandon(self.use)


Placement = Union[Own, Inline, Place, Cached]


@dataclass
class Item:
    """One event of a get (or one batch buffer to make), and where it goes."""
    rid: int
    get: Union[Get, MakeArena]
    seq: int
    arrived: float
    nbytes: Optional[int] = None          # the frame's size, once known
    prefetched: Optional[Frame] = None    # read ahead: its size was not known before
    placement: Optional[Placement] = None
    bypass: bool = False                  # the frame cache had no room for it
    made: Optional[Extent] = None         # a batch buffer, for MakeArena
    error: Optional[ProtocolError] = None

    @property
    def event(self) -> int:
        return self.get.events[self.seq]

    @property
    def done(self) -> bool:
        return isinstance(self.get, MakeArena) or self.seq == len(self.get.events) - 1

    def where(self) -> Tuple[Optional[int], Optional[int]]:
        """The seq and event a reply about this item names (none for a buffer)."""
        return (None, None) if isinstance(self.get, MakeArena) else (self.seq, self.event)


@functools.lru_cache(maxsize=64)
def _dtype(text: str) -> np.dtype:
    """A batch buffer's frame dtype: a plain numeric one (parsed once per
    text, not for every frame placed; a refused text raises every time)."""
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        raise ProtocolError(BAD_ARENA, f"dtype {text!r} is not a numpy dtype") from None
    if dtype.kind not in DTYPE_KINDS or dtype.itemsize == 0 or dtype.fields is not None:
        raise ProtocolError(BAD_ARENA, f"dtype {text!r} is not a plain numeric dtype")
    return dtype
