"""Where in a pool a new extent goes: the first gap between the extents of
live rows that holds it (pool_index.py keeps no free list), and which
frame-cache entry gives way when no gap does.

Small extents (frames, cache entries) are placed from the bottom of the
pool and batch buffers from the top, so the two do not cut each other's
room into pieces; placing lowest first reuses pages taken before (a pool
takes pages bottom up, as its first extents need them). A server with a
frame cache takes the cache's pages ahead, bottom up, while idle: a batch
buffer goes to the top of those first (`below`), where its pages exist,
and only then to the top of the pool, where they would be fresh.
Everything here runs under the index's lock.
"""
from typing import Optional

import numpy as np

from .cache_policy import choose_victim
from .pool_index import CACHED, FREE, MEMORY, Held, Index


def first_fit(index: Index, pool: int, pool_size: int, size: int,
              from_top: bool = False) -> Optional[int]:
    """The offset of the lowest (or highest) gap of `size` bytes in a pool's
    first `pool_size` bytes, or None."""
    rows = index.rows_where(MEMORY, pool=pool)
    starts = index.offset[rows]
    order = np.argsort(starts)
    starts, ends = starts[order], starts[order] + index.size[rows][order]
    gap_starts = np.concatenate(([0], ends))
    gap_ends = np.minimum(np.concatenate((starts, [pool_size])), pool_size)
    fits = (gap_ends - gap_starts >= size).nonzero()[0]
    if not fits.size:
        return None
    if from_top:
        return int(gap_ends[fits[-1]] - size)
    return int(gap_starts[fits[0]])


def evict_one(index: Index, pool: int, held: Held, read_ahead: bool = False) -> bool:
    """Give up the cache entry of `pool` the policy chooses among those no
    request pins and no client holds; False if none may go. For read-ahead
    only what the policy lets read-ahead take (cache_policy.py)."""
    rows = index.rows_where((CACHED,), pool=pool)
    evictable = index.pins[rows].sum(axis=1) == 0
    tick, horizon = index.get("tick"), index.get("horizon")
    while True:
        k = choose_victim(evictable, index.last[rows], index.interval[rows], index.uses[rows],
                          tick, horizon, read_ahead)
        if k is None:
            return False
        row = rows[k]
        if held(pool, int(index.offset[row]), int(index.size[row])):
            evictable[k] = False        # a client still reads it (its worker died)
            continue
        index.state[row] = FREE
        index.count("evictions")
        return True


def place(index: Index, pool: int, pool_size: int, size: int, held: Held,
          from_top: bool = False, read_ahead: bool = False, below: int = 0) -> Optional[int]:
    """An offset for an extent of `size` bytes, evicting cache entries of the
    pool until a gap holds it; None if none can be had. From the top, a gap
    in the first `below` bytes (pages taken ahead) comes first."""
    if from_top and below:
        offset = first_fit(index, pool, below, size, from_top)
        if offset is not None:
            return offset
    while True:
        offset = first_fit(index, pool, pool_size, size, from_top)
        if offset is not None or not evict_one(index, pool, held, read_ahead):
            return offset
