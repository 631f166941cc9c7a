"""The pool's index: what every extent of the pool is, shared by every
worker of one server, and the budget it is accounted against.

One table in an anonymous shared mapping the master makes before forking,
in named columns, a row per extent in use and per open connection of a
group. A row's `state` says what it is:

  CONN      an open shared-memory connection (no memory): a group's batch
            buffers live while one of its connections does
  TRANSFER  a frame handed to a connection, until it releases it, and kept
            for the connection's next frames after (frame_memory.py; each
            worker counts what it keeps in `kept_frames` and `kept_bytes`)
  BATCH     a batch buffer of a group, claimed by one connection at a time
  RESERVED  budget without pool memory: a frame sent inline, a legacy segment
  ORPHAN    memory whose owner is gone and that a client may still hold:
            free again once nobody holds it (`sweep`)
  FILLING   a frame-cache entry a worker is writing
  CACHED    a frame-cache entry

Crash safety: every change is made under one lock and is a series of
single writes, each leaving the table consistent. A new row's fields are
written while its state says FREE and the state is written last; a row is
given back by writing its state alone; free memory is the space between
the extents of live rows, so nothing is ever split or merged. A process
that dies anywhere in a change leaves a row that still says FREE, or a row
whose owner is dead. Rows name their owner (a worker slot) with the
generation the master gives each worker it starts, and bumps, without a
lock, when it reaps one; a worker taking the lock (`locked`) first
reclaims what dead generations left: what they were writing is freed,
what they had handed out is orphaned (a client may still read it), their
pins are dropped.

The lock is a POSIX record lock, which the kernel drops when its holder
dies. It guards a few table operations at a time, never a source call or
an allocation of pages. A worker waiting for it keeps its heartbeat going,
and stamps when it last asked (`since`): the master takes a holder whose
stamp is older than LOCK_LIMIT for frozen and replaces it, and never takes
the lock itself.

Budget: the rows in TRANSFER, BATCH, RESERVED and ORPHAN together stay
within `--shm-budget`; a group (a client's connections) that holds memory
may take more only within its fair share, budget // (groups holding + 1),
so a newcomer always finds room, except that a connection holding nothing
may take any room left. Cache rows stay within `--frame-cache`.
"""
import enum
import errno
import fcntl
import mmap
import struct
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

STATES = FREE, CONN, TRANSFER, BATCH, RESERVED, ORPHAN, FILLING, CACHED = range(8)
MEMORY = (TRANSFER, BATCH, ORPHAN, FILLING, CACHED)      # rows that are extents of a pool
BUDGET = (TRANSFER, BATCH, RESERVED, ORPHAN)
CACHE = (FILLING, CACHED)
OWNED = (CONN, TRANSFER, RESERVED, FILLING, BATCH)      # rows whose `owner` may die
COLUMNS = ("state", "pool", "offset", "size", "owner", "gen", "conn", "group", "ticket",
           "key_a", "key_b", "last", "interval", "uses", "frame_bytes", "meta_len")
HEADER = ("used", "tick", "hits", "misses", "read_ahead", "evictions", "horizon", "peak",
          "warm_claimed", "warm_taken", "warm_failed", "warm_mapped")
PER_WORKER = ("generation", "reclaimed", "since", "kept_frames", "kept_bytes")
LOCK_LIMIT = 2.0        # seconds a holder may keep the lock before it counts as frozen
BATCH_SHARE = 3         # quarters of the budget batch buffers may fill
_F_GETLK = struct.Struct("hhqqi")     # POSIX struct flock, 64-bit off_t (l_pid last)
Held = Callable[[int, int, int], bool]   # (pool, offset, size) -> does a client hold it?
_MEMBERS: Dict[Tuple[int, ...], np.ndarray] = {}      # states -> which states are among them


class Grant(enum.Enum):
    """The budget's answer to a reservation."""
    GRANTED = "granted"
    WAIT = "wait"              # no room now: worth waiting for a release
    TOO_LARGE = "too large"    # larger than the whole budget: never
    PENDING = "pending"        # another worker is writing this frame into the frame cache


def refusal(grant: Grant, nbytes: int, budget: int, what: str = "a frame") -> str:
    """Why `nbytes` for `what` were not granted."""
    if grant is Grant.TOO_LARGE and what == "a batch buffer":
        return (f"{what} of {nbytes} bytes is larger than the room batch buffers have: "
                f"{BATCH_SHARE} quarters of the shared-memory budget of {budget} bytes "
                f"(iserver --shm-budget)")
    if grant is Grant.TOO_LARGE:
        return (f"{what} of {nbytes} bytes is larger than the whole shared-memory budget of "
                f"{budget} bytes (iserver --shm-budget)")
    return (f"no room for {what} of {nbytes} bytes: the shared-memory budget of {budget} bytes "
            f"is in use (a client's share is budget / (clients holding memory + 1)); release "
            f"frames or try again later")


class IndexLock:
    """The index's lock: a POSIX record lock on a file made before forking,
    taken by polling so that a waiter keeps its heartbeat (see the module
    docstring)."""

    def __init__(self, since: np.ndarray) -> None:
        self._file = tempfile.TemporaryFile()
        self.since = since

    @contextmanager
    def held(self, slot: int, heartbeat: Callable[[], None]) -> Iterator[None]:
        pause = 20e-6
        while True:
            self.since[slot] = time.monotonic_ns()
            try:
                fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            heartbeat()
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        try:
            yield
        finally:
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self.since[slot] = 0

    def holder(self) -> Optional[int]:
        """The pid holding the lock, asked without taking it (F_GETLK)."""
        query = _F_GETLK.pack(fcntl.F_WRLCK, 0, 0, 0, 0) + b"\0" * 4
        kind, _, _, _, pid = _F_GETLK.unpack(fcntl.fcntl(self._file, fcntl.F_GETLK, query)[:28])
        return None if kind == fcntl.F_UNLCK else pid


class Index:
    """The shared table (see the module docstring). Columns are attributes
    (`index.state`, `index.offset`, ...), full length; `live()` is the rows
    ever used, which every scan looks at."""

    def __init__(self, rows: int, workers: int, budget: int, cache_limit: int) -> None:
        self.rows, self.workers = rows, workers
        self.budget, self.cache_limit = budget, cache_limit
        sizes = [rows] * len(COLUMNS) + [rows * workers] + [workers] * len(PER_WORKER) \
            + [len(HEADER)]
        self._map = mmap.mmap(-1, 8 * sum(sizes))
        arrays, offset = [], 0
        for n in sizes:
            arrays.append(np.ndarray((n,), np.int64, buffer=self._map, offset=offset))
            offset += 8 * n
        for name, array in zip(COLUMNS, arrays):
            setattr(self, name, array)
        self._columns = arrays[1:len(COLUMNS)]
        self.pins = arrays[len(COLUMNS)].reshape(rows, workers)
        for name, array in zip(PER_WORKER, arrays[len(COLUMNS) + 1:]):
            setattr(self, name, array)
        self.header = arrays[-1]
        self.owner[:] = -1
        self.lock = IndexLock(self.since)

    def __getstate__(self) -> None:
        raise TypeError("the index is shared by forking, never pickled")

    # -- the header -----------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> int:
        """Add to a header counter (under the lock); its new value."""
        i = HEADER.index(name)
        self.header[i] += n
        return int(self.header[i])

    def get(self, name: str) -> int:
        return int(self.header[HEADER.index(name)])

    @property
    def used(self) -> int:
        return self.get("used")

    def live(self) -> slice:
        return slice(0, self.used)

    # -- rows (under the lock) ----------------------------------------------------------
    @contextmanager
    def locked(self, slot: int, heartbeat: Callable[[], None], held: Held) -> Iterator[None]:
        """The lock, with what dead workers left reclaimed first."""
        with self.lock.held(slot, heartbeat):
            stale = (self.generation != self.reclaimed).nonzero()[0]
            if stale.size:
                self.reclaim(stale, held)
            yield

    def new_row(self) -> Optional[int]:
        """A FREE row to fill in (its state written last): one given back before,
        else the first never used; None when the table is full."""
        free = (self.state[self.live()] == FREE).nonzero()[0]
        if free.size:
            return int(free[0])
        used = self.used
        if used == self.rows:
            return None
        self.count("used")        # visible, still FREE, before anything is written to it
        return used

    def put(self, state: int, **fields: int) -> Optional[int]:
        """A new row of `state` with these fields (the rest zero, no owner);
        None when the table is full."""
        row = self.new_row()
        if row is None:
            return None
        for name, column in zip(COLUMNS[1:], self._columns):
            column[row] = fields.get(name, -1 if name == "owner" else 0)
        self.pins[row] = 0
        self.state[row] = state
        return row

    def rows_where(self, states: Tuple[int, ...], **equal: int) -> np.ndarray:
        """Live rows in one of `states` whose columns equal the values given."""
        live = self.live()
        member = _MEMBERS.get(states)
        if member is None:
            member = _MEMBERS[states] = np.isin(np.arange(len(STATES)), states)
        mask = member[self.state[live]]
        for name, value in equal.items():
            mask &= getattr(self, name)[live] == value
        return mask.nonzero()[0]     # np.flatnonzero costs 8 times as much on small tables

    def alive(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` have an owner whose generation is current (or none)."""
        owner = self.owner[rows]
        current = self.generation[np.maximum(owner, 0)]
        return (owner < 0) | (self.gen[rows] == current)

    # -- dead workers ---------------------------------------------------------------------
    def reclaim(self, slots: np.ndarray, held: Held) -> None:
        """What the dead generations of these worker slots left: rows they were
        writing freed, rows they had handed out orphaned, their claims on batch
        buffers and their pins dropped, and the batch buffers of groups that
        lost their last connection orphaned."""
        rows = self.rows_where(OWNED)
        rows = rows[np.isin(self.owner[rows], slots) & ~self.alive(rows)]
        groups = set(int(g) for g in self.group[rows[self.state[rows] == CONN]])
        for row in rows:
            state = self.state[row]
            if state == BATCH:
                self.owner[row] = -1
            elif state == TRANSFER:
                self.group[row] = 0
                self.owner[row] = -1
                self.state[row] = ORPHAN
            else:
                self.state[row] = FREE
        for slot in slots:
            self.pins[:, slot] = 0
            self.kept_frames[slot] = self.kept_bytes[slot] = 0
            self.reclaimed[slot] = self.generation[slot]
        self.close_groups(groups, held)

    def close_groups(self, groups: Iterable[int], held: Held) -> None:
        """Orphan the batch buffers of the groups with no connection left."""
        for group in groups:
            if not self.rows_where((CONN,), group=group).size:
                for row in self.rows_where((BATCH,), group=group):
                    self.group[row] = 0
                    self.owner[row] = -1
                    self.state[row] = ORPHAN
        self.sweep(held)

    def sweep(self, held: Held) -> int:
        """Free the orphans nobody holds any more; returns how many."""
        freed = 0
        for row in self.rows_where((ORPHAN,)):
            if not held(int(self.pool[row]), int(self.offset[row]), int(self.size[row])):
                self.state[row] = FREE
                freed += 1
        return freed

    # -- the budget -------------------------------------------------------------------------
    def grant(self, group: int, nbytes: int, slot: int = -1, conn: int = -1,
              batch: bool = False) -> Grant:
        """Whether `group` may take `nbytes` more of the budget now for the
        connection `conn` of worker `slot` (see the module docstring); the
        caller then puts the row. A connection holding no frame may take any
        room left, so each connection of a group gets a frame at a time, and
        a client reading its connections in turn never waits on itself, even
        when the group's batch buffers fill its share (a connection's claimed
        batch buffers count as its holding only for another batch buffer).
        Batch buffers (`batch`) may fill BATCH_SHARE of the budget: frames
        always find room beside them."""
        limit = self.budget * BATCH_SHARE // 4 if batch else self.budget
        if nbytes > limit:
            return Grant.TOO_LARGE
        rows = self.rows_where(BUDGET)
        sizes = self.size[rows]
        in_use = int(sizes.sum())
        if in_use + nbytes > limit:
            return Grant.WAIT
        groups = self.group[rows]
        held = int(sizes[groups == group].sum())
        if held and self._holds_own(rows, slot, conn, batch) \
                and held + nbytes > self.budget // (len(set(groups.tolist()) - {0, group}) + 2):
            return Grant.WAIT
        peak = HEADER.index("peak")
        self.header[peak] = max(int(self.header[peak]), in_use + nbytes)
        return Grant.GRANTED

    def _holds_own(self, rows: np.ndarray, slot: int, conn: int, batch: bool) -> bool:
        """Whether connection `conn` of worker `slot` holds any of `rows`: for
        a frame, a batch buffer it claimed is the group's, not its own."""
        mine = (self.owner[rows] == slot) & (self.conn[rows] == conn)
        if not batch:
            mine &= self.state[rows] != BATCH
        return bool(mine.any())

    def cache_bytes(self) -> int:
        return int(self.size[self.rows_where(CACHE)].sum())

    # -- what stats show ----------------------------------------------------------------
    def budget_stats(self) -> Dict[str, int]:
        rows = self.rows_where(BUDGET)
        groups = self.group[rows]
        live, batches = self.live(), self.rows_where((BATCH,))
        return {"shm_bytes": int(self.size[rows].sum()), "shm_peak_bytes": self.get("peak"),
                "batch_buffers": int(batches.size), "batch_bytes": int(self.size[batches].sum()),
                "shm_budget": self.budget, "holders": len(set(groups[groups != 0].tolist())),
                "orphan_bytes": int(self.size[self.rows_where((ORPHAN,))].sum()),
                "kept_bytes": int(self.kept_bytes.sum()),
                "frames_held": int(self.rows_where((TRANSFER,)).size - self.kept_frames.sum()
                                   + self.pins[live].sum())}
