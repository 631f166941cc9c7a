"""One worker's use of the pool: extents for frames, batch buffers of
connection groups, budget for frames that live elsewhere, the connections
of groups, and the idle work that gets pages ready ahead of need.

Every operation takes the index's lock for a few table writes
(pool_index.py) and does anything slow (taking pages, filling page
tables, testing locks of many rows) outside it. The memory of an extent
given out has pages (`Mapping.ready`) before anything is written into it:
a node out of memory is the error `no_memory`, never a fault.
"""
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple,
                    TypeVar)

from psana_ipc.protocol.errors import BAD_ARENA, NO_MEMORY, ProtocolError
from psana_ipc.protocol.pool import TICKET_BYTES

from .pool_allocator import place
from .pool_index import BATCH, CONN, FREE, ORPHAN, RESERVED, TRANSFER, Grant, Index
from .pool_pages import PAGE, Held, Mapping, NoRoom, PoolFile, round_up

WARM_BYTES = 8 << 20        # pages taken (or mapped in) at a time by an idle worker
WARM_WAIT = 0.005           # how long a worker waits for the others' steps to end
SHM_POOL = 0
T = TypeVar("T")


@dataclass(frozen=True)
class Extent:
    """An extent of a pool as this worker handed it out (its row and ticket
    identify that use; a later use of the row has another ticket)."""
    row: int
    pool: int
    offset: int
    size: int
    ticket: int


_tickets = random.Random()       # seeded from the OS, and again in every forked process
os.register_at_fork(after_in_child=_tickets.seed)


def new_ticket() -> int:
    """A ticket for a new use of an extent: an identity, not a secret, so a
    generator seeded per process, not a system call per frame."""
    return _tickets.getrandbits(62) | 1


def extent_size(nbytes: int) -> int:
    """Bytes of an extent holding `nbytes` and its ticket."""
    return round_up(nbytes + TICKET_BYTES)


class FrameMemory:
    """See the module docstring; made in the master, `start`ed in the worker."""

    def __init__(self, index: Index, pools: List[PoolFile], slot: int,
                 warm_target: int = 0) -> None:
        self.index = index
        self.pools = {p.id: p for p in pools}
        self.slot = slot
        self.warm_target = warm_target // PAGE * PAGE
        self.maps: Dict[int, Mapping] = {}
        self.heartbeat: Callable[[], None] = lambda: None
        self._mapped_to = 0         # this worker's page tables cover the cache's pages below
        self._kept: Dict[int, List[Extent]] = {}      # connection -> extents it released
        self._kept_tally = [0, 0]       # their frames and bytes, told to the index for stats

    def start(self, heartbeat: Callable[[], None]) -> None:
        """In the worker: map the pools, then reclaim what this slot's dead
        predecessor left before anything is served."""
        self.heartbeat = heartbeat
        self.maps = {pid: Mapping(p) for pid, p in self.pools.items()}
        with self.locked():
            pass

    def close(self) -> None:
        for mapping in self.maps.values():
            mapping.close()
        self.maps = {}

    @property
    def generation(self) -> int:
        return int(self.index.generation[self.slot])

    def locked(self) -> ContextManager[None]:
        return self.index.locked(self.slot, self.heartbeat, self.held)

    def held(self, pool: int, offset: int, size: int) -> bool:
        return self.maps[pool].held(offset, size)

    def _owned(self, conn: int, group: int) -> Dict[str, int]:
        return {"owner": self.slot, "gen": self.generation, "conn": conn, "group": group}

    # -- connections of groups ------------------------------------------------------------
    def connect(self, conn: int, group: int) -> None:
        """A shared-memory connection of `group` opened: its batch buffers live."""
        with self.locked():
            if self.index.put(CONN, **self._owned(conn, group)) is None:
                raise ProtocolError(NO_MEMORY, "the pool's index is full: too many open "
                                               "connections and frames")

    def disconnect(self, conn: int, group: int) -> None:
        """The connection closed: what it kept is given back, what it was
        handed becomes orphaned (its client may still read it), its claims
        on batch buffers go, its reservations are given back; the group's
        batch buffers go too if it was the group's last connection."""
        ix = self.index
        self.drop_kept(conn)            # released: free now, where a held frame is orphaned
        with self.locked():
            mine = ix.rows_where((CONN, TRANSFER, RESERVED, BATCH), owner=self.slot, conn=conn)
            for row in mine[ix.alive(mine)]:
                state = ix.state[row]
                if state == BATCH:
                    ix.owner[row] = -1
                elif state == TRANSFER:
                    ix.owner[row] = -1
                    ix.group[row] = 0
                    ix.state[row] = ORPHAN
                else:
                    ix.state[row] = FREE
            ix.close_groups((group,), self.held)

    # -- frames of their own ----------------------------------------------------------------
    def take(self, conn: int, group: int, nbytes: int) -> Tuple[Grant, Optional[Extent]]:
        """An extent for a frame of `nbytes` handed to a connection: one it
        released and kept (see `release`), else a new one within the budget
        and the group's fair share."""
        size = extent_size(nbytes)
        kept = self._kept.get(conn, ())
        for at in range(len(kept) - 1, -1, -1):         # the last released first
            if size <= kept[at].size <= 2 * size:
                break
        else:
            self.drop_kept(conn)        # never holding budget a frame of another size waits for
            return self._short_of_room(
                lambda: self._extent(TRANSFER, size, self._owned(conn, group)))
        old = kept.pop(at)
        self._count_kept((old,), -1)
        extent = Extent(old.row, old.pool, old.offset, old.size, new_ticket())
        self.index.ticket[extent.row] = extent.ticket   # the row is this worker's alone
        self.maps[extent.pool].stamp(extent.offset, extent.size, extent.ticket)  # pages ready
        return Grant.GRANTED, extent

    def release(self, conn: int, extents: List[Extent], keep: bool) -> None:
        """Extents a connection's client released: kept for its next frames
        (`keep`: the connection decides for how long; still charged to it,
        as its frames in flight are, and written again only under the
        extent's exclusive lock), else given back. A frame taken from them
        costs no index work: a shared table and its lock for every frame is
        what made the zero-copy path slower than a slot per connection."""
        if keep:
            self._kept.setdefault(conn, []).extend(extents)
            self._count_kept(extents, 1)
        else:
            kept = self._kept.pop(conn, [])
            self.give(*extents, *kept)
            self._count_kept(kept, -1)

    def keeps(self, conn: int) -> bool:
        return bool(self._kept.get(conn))

    def drop_kept(self, conn: int) -> None:
        """Give a connection's kept extents back."""
        kept = self._kept.pop(conn, None)
        if kept:
            self.give(*kept)
            self._count_kept(kept, -1)

    def _count_kept(self, extents: Sequence[Extent], sign: int) -> None:
        """What this worker keeps, for stats: kept extents are no client's frames."""
        tally = self._kept_tally
        tally[0] += sign * len(extents)
        for extent in extents:
            tally[1] += sign * extent.size
        self.index.kept_frames[self.slot], self.index.kept_bytes[self.slot] = tally

    def _short_of_room(self, ask: Callable[[], Tuple[Grant, T]]) -> Tuple[Grant, T]:
        """`ask` for budget; when it must wait, the extents this worker keeps
        for its connections' next frames give way first, and it asks again."""
        grant, got = ask()
        if grant is Grant.WAIT and self._kept:
            for conn in list(self._kept):
                self.drop_kept(conn)
            grant, got = ask()
        return grant, got

    def give(self, *extents: Extent, state: int = TRANSFER) -> None:
        """Extents the client released (its holds went before), under one lock."""
        with self.locked():
            for extent in extents:
                if self._is(extent, state):
                    self.index.state[extent.row] = FREE

    def orphan(self, extent: Extent) -> None:
        """An extent a client may still hold (or held when it was to be
        written): free once nobody does."""
        with self.locked():
            if self._is(extent, self.index.state[extent.row]):
                self.index.owner[extent.row] = -1
                self.index.group[extent.row] = 0
                self.index.state[extent.row] = ORPHAN

    def _is(self, extent: Extent, state: int) -> bool:
        ix = self.index
        return bool(ix.state[extent.row] == state and ix.ticket[extent.row] == extent.ticket)

    def _extent(self, state: int, size: int, fields: Dict[str, int],
                from_top: bool = False) -> Tuple[Grant, Optional[Extent]]:
        """A new extent of `size` in the pool in memory, held by no client."""
        pool, ix = self.pools[SHM_POOL], self.index
        with self.locked():
            grant = ix.grant(fields["group"], size, self.slot, fields["conn"], state == BATCH)
            if grant is not Grant.GRANTED:
                return grant, None
            while True:
                offset = place(ix, SHM_POOL, pool.size, size, self.held, from_top,
                               below=ix.get("warm_taken"))
                if offset is None:
                    return Grant.WAIT, None
                held = self.held(SHM_POOL, offset, size)
                ticket = new_ticket()
                row = ix.put(ORPHAN if held else state, pool=SHM_POOL, offset=offset,
                             size=size, ticket=ticket, **(fields if not held else {}))
                if row is None:
                    return Grant.WAIT, None
                if not held:        # else a client of an earlier use still reads there
                    break
        extent = Extent(row, SHM_POOL, offset, size, ticket)
        self.ready(extent)
        return Grant.GRANTED, extent

    def ready(self, extent: Extent) -> None:
        """Pages for an extent this worker holds, and its ticket at its end;
        `no_memory` (the extent given back) when the node has none."""
        try:
            self.maps[extent.pool].ready(extent.offset, extent.size)
        except NoRoom as e:
            self.give(extent, state=int(self.index.state[extent.row]))
            raise ProtocolError(NO_MEMORY, str(e)) from None
        self.maps[extent.pool].stamp(extent.offset, extent.size, extent.ticket)

    # -- budget alone ---------------------------------------------------------------------
    def reserve(self, conn: int, group: int, nbytes: int) -> Tuple[Grant, Optional[int]]:
        """Budget for a frame that lives elsewhere (inline, a legacy segment):
        the row to give back with `unreserve`."""
        return self._short_of_room(lambda: self._reserve(conn, group, round_up(nbytes)))

    def _reserve(self, conn: int, group: int, size: int) -> Tuple[Grant, Optional[int]]:
        with self.locked():
            grant = self.index.grant(group, size, self.slot, conn)
            if grant is not Grant.GRANTED:
                return grant, None
            row = self.index.put(RESERVED, pool=-1, size=size, ticket=new_ticket(),
                                 **self._owned(conn, group))
            return (Grant.GRANTED, row) if row is not None else (Grant.WAIT, None)

    def unreserve(self, row: int) -> None:
        with self.locked():
            if self.index.state[row] == RESERVED and self.index.owner[row] == self.slot:
                self.index.state[row] = FREE

    # -- batch buffers ----------------------------------------------------------------------
    def batch(self, conn: int, group: int, nbytes: int) -> Tuple[Grant, Optional[Extent]]:
        """A batch buffer of at least `nbytes` for a connection of `group`: the
        smallest idle one of the group's (claimed by no connection, held by no
        client), else a new one from the top of the pool (pool_allocator.py)."""
        size = extent_size(nbytes)
        ix = self.index
        with self.locked():
            idle = ix.rows_where((BATCH,), group=group, owner=-1)
            idle = idle[ix.size[idle] >= size]
            for row in idle[ix.size[idle].argsort()]:
                if not self.held(SHM_POOL, int(ix.offset[row]), int(ix.size[row])):
                    ix.gen[row], ix.conn[row] = self.generation, conn
                    ix.ticket[row] = new_ticket()
                    ix.owner[row] = self.slot          # claimed: written last
                    extent = self._extent_of(int(row))
                    break
            else:
                extent = None
        if extent is None:
            return self._short_of_room(
                lambda: self._extent(BATCH, size, self._owned(conn, group), from_top=True))
        # its pages were taken when it was made; each writer maps what it writes
        self.maps[extent.pool].stamp(extent.offset, extent.size, extent.ticket)
        return Grant.GRANTED, extent

    def _extent_of(self, row: int) -> Extent:
        ix = self.index
        return Extent(row, int(ix.pool[row]), int(ix.offset[row]), int(ix.size[row]),
                      int(ix.ticket[row]))

    def find_batch(self, ticket: int, group: int) -> Extent:
        """The group's batch buffer of this ticket (`bad_arena` for any other)."""
        with self.locked():
            rows = self.index.rows_where((BATCH,), group=group, ticket=ticket)
            if not rows.size:
                raise ProtocolError(BAD_ARENA, f"{ticket} is not a batch buffer of this "
                                               f"connection's group (freed, or its group's "
                                               f"connections all closed?)")
            return self._extent_of(int(rows[0]))

    def free_batches(self, tickets: Tuple[int, ...], group: int) -> List[int]:
        """Give back batch buffers of the group; the tickets that were not one."""
        bad = []
        with self.locked():
            for ticket in tickets:
                rows = self.index.rows_where((BATCH,), group=group, ticket=ticket)
                if not rows.size:
                    bad.append(ticket)
                    continue
                self.index.owner[rows[0]] = -1
                self.index.group[rows[0]] = 0
                self.index.state[rows[0]] = ORPHAN
            self.index.sweep(self.held)
        return bad

    # -- idle work --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Free orphans nobody holds any more."""
        with self.locked():
            self.index.sweep(self.held)

    def warm(self) -> bool:
        """Idle work, one step at a time: take WARM_BYTES more of the pages a
        frame cache may fill (`warm_target`); once the workers' steps have
        taken them all, fill this worker's page tables for them. Entries are
        then written into pages that exist and are mapped, where fresh ones
        cost each frame milliseconds. False once done, or when the node has no
        room for them."""
        ix, mapping = self.index, self.maps[SHM_POOL]
        with self.locked():
            start = ix.get("warm_claimed")
            if start < self.warm_target:
                ix.count("warm_claimed", WARM_BYTES)
            taken, failed = ix.get("warm_taken"), ix.get("warm_failed")
        if failed:
            return False
        if start < self.warm_target:
            size = min(WARM_BYTES, self.warm_target - start)
            try:
                mapping.ready(start, size)
            except NoRoom:
                with self.locked():
                    ix.count("warm_failed")
                return False
            with self.locked():
                ix.count("warm_taken", size)
            return True
        if taken < self.warm_target:
            time.sleep(WARM_WAIT)       # another worker's step: not a spin that takes its core
            return True
        end = min(self.warm_target, self._mapped_to + WARM_BYTES)
        mapping.map_in(self._mapped_to, end - self._mapped_to)
        self._mapped_to = end
        if end < self.warm_target:
            return True
        with self.locked():
            ix.count("warm_mapped")
        return False

    def writing(self, extent: Extent) -> ContextManager[None]:
        """Write into an extent of this worker's own (a frame, a cache entry
        being filled), under its exclusive lock: Held if a client of an
        earlier use still holds some of it."""
        return self.maps[extent.pool].locked(extent.offset, extent.size, exclusive=True)

    @contextmanager
    def writing_into(self, buffer: Extent, start: int,
                     nbytes: int) -> Iterator[Tuple[Mapping, int]]:
        """Write `nbytes` at `start` of a batch buffer (as `find_batch` gave it):
        under a lock shared with its client and the group's other writers,
        which keeps the memory from going to another use meanwhile. Before
        writing, the buffer is checked to be what it was (the group's, or
        given back and not yet reused), without the index's lock: while the
        range is locked, nobody can give it to another use. Gives the mapping
        and the offset in the pool."""
        if start < 0 or start + nbytes > buffer.size - TICKET_BYTES:
            raise ProtocolError(BAD_ARENA, f"a frame of {nbytes} bytes at offset {start} runs "
                                           f"past the end of batch buffer {buffer.ticket} "
                                           f"({buffer.size - TICKET_BYTES} bytes)")
        mapping, ix = self.maps[buffer.pool], self.index
        try:
            with mapping.locked(buffer.offset + start, max(1, nbytes), exclusive=False):
                if ix.ticket[buffer.row] != buffer.ticket \
                        or ix.state[buffer.row] not in (BATCH, ORPHAN):
                    raise Held("the batch buffer went to another use")
                mapping.map_in(buffer.offset + start, nbytes)   # pages taken when it was made
                yield mapping, buffer.offset + start
        except Held:
            raise ProtocolError(BAD_ARENA, f"batch buffer {buffer.ticket} was given back") \
                from None
