"""Which cached frame to give up when the frame cache needs room.

Training reads a whole run every epoch, in a cycle. With a run larger than
the cache, LRU evicts each frame just before it is needed again: under a
cyclic scan its hit rate is 0. This policy keeps a stable share instead,
and still lets go of what is no longer read:

- An entry read twice or more by clients is *protected*; we remember the
  interval between its last two reads. It stays as long as it keeps to its
  rhythm: once idle for more than twice its own interval, its pattern has
  stopped (a finished run, another job) and it *expires*.
- An entry read once is *probationary*. When room is needed, the newest
  probationary entry goes first: in a scan larger than the cache the frames
  admitted first stay until their next epoch (where they become protected)
  while the tail of the scan churns through one entry. Under a cyclic scan
  of a run N times the cache this gives about 1/N of the reads as hits,
  what an oracle (Belady) gets, where LRU gets none.
- A probationary entry also expires when idle for longer than the cache's
  horizon, twice the longest reuse interval seen: frames of a run nobody
  reads any more leave once a full cycle of the current work has gone by.
- Read ahead, not read yet (no client read): those go after probationary
  entries (oldest first), as they are about to be asked for.
- When only protected entries are left, the least recently read one goes:
  a new pattern can always get in.

Victims are chosen: expired (oldest first), probationary (newest first),
read-ahead (oldest first), protected (least recently read first). Read-ahead
itself may only take free room or expired entries: it never pushes out a
frame that a client has read and may read again.

The arrays are the columns of the shared index (see frame_cache.py), so the
same code runs in the server and in the benchmark's simulation.
"""
from typing import Optional, Sequence

import numpy as np


def choose_victim(evictable: np.ndarray, last_use: np.ndarray, interval: np.ndarray,
                  uses: np.ndarray, now: int, horizon: int,
                  read_ahead: bool = False) -> Optional[int]:
    """The row to evict among `evictable` ones (ready, not pinned), or None.

    `last_use`: tick of the last client read (or of insertion); `interval`:
    ticks between its last two client reads (0: fewer than two); `uses`:
    client reads so far (0: read ahead and not read yet); `horizon`: the
    longest reuse interval seen (0: none yet)."""
    rows = np.flatnonzero(evictable)
    if not rows.size:
        return None
    idle = now - last_use[rows]
    protected = uses[rows] >= 2
    expired = np.where(protected, idle > 2 * interval[rows],
                       (horizon > 0) & (idle > 2 * horizon))
    if expired.any():
        cand = rows[expired]
        return int(cand[np.argmin(last_use[cand])])
    if read_ahead:
        return None
    probation = uses[rows] == 1
    if probation.any():
        cand = rows[probation]
        return int(cand[np.argmax(last_use[cand])])
    unread = uses[rows] == 0
    if unread.any():
        cand = rows[unread]
        return int(cand[np.argmin(last_use[cand])])
    return int(rows[np.argmin(last_use[rows])])


def simulate(trace: Sequence[int], capacity: int, lru: bool = False) -> float:
    """The hit rate of a cache of `capacity` frames over a trace of client
    reads, with this policy (or LRU): the bookkeeping of frame_cache.py
    without the memory, for the benchmark and the tests."""
    keys = np.full(capacity, -1, np.int64)
    last, interval, uses = (np.zeros(capacity, np.int64) for _ in range(3))
    horizon = hits = 0
    for tick, key in enumerate(trace, start=1):
        (found,) = np.nonzero(keys == key)
        if found.size:
            row = found[0]
            hits += 1
            interval[row] = tick - last[row]
            horizon = max(horizon, int(interval[row]))
            uses[row] += 1
            last[row] = tick
            continue
        free = np.flatnonzero(keys < 0)
        if free.size:
            row = free[0]
        elif lru:
            row = int(np.argmin(last))
        else:
            row = choose_victim(keys >= 0, last, interval, uses, tick, horizon)
        keys[row], last[row], interval[row], uses[row] = key, tick, 0, 1
    return hits / max(1, len(trace))
