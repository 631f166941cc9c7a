"""The pool's index in one process: rows, the budget's fair share, what a dead
worker leaves reclaimed, orphans freed only once nobody holds them, and the
lock's holder and stamps as the master reads them."""
import os
import time

import pytest

from psana_ipc.server.pool_index import (BATCH, CACHED, CONN, FILLING, FREE, ORPHAN, RESERVED,
                                         TRANSFER, Grant, Index)



def _index(budget: int = 120, cache: int = 0, rows: int = 64, workers: int = 2) -> Index:
    return Index(rows, workers, budget, cache)


def _locked(index: Index, slot: int = 0, held=lambda p, o, s: False):
    return index.locked(slot, lambda: None, held)


def test_a_row_is_visible_only_once_its_state_is_written():
    ix = _index()
    with _locked(ix):
        row = ix.new_row()
        ix.offset[row], ix.size[row] = 4096, 8192
        assert not ix.rows_where((TRANSFER,)).size       # fields written, state still FREE
        ix.state[row] = TRANSFER
        assert list(ix.rows_where((TRANSFER,))) == [row]


def test_rows_given_back_are_reused_lowest_first():
    ix = _index()
    with _locked(ix):
        rows = [ix.put(TRANSFER, size=1, group=1) for _ in range(4)]
        ix.state[rows[1]] = FREE
        ix.state[rows[2]] = FREE
        assert ix.put(RESERVED, size=1, group=1) == rows[1]
        assert ix.used == 4


def test_a_full_table_gives_no_row():
    ix = _index(rows=2)
    with _locked(ix):
        assert ix.put(CONN, group=1) == 0 and ix.put(CONN, group=1) == 1
        assert ix.put(CONN, group=1) is None


def test_the_fair_share_rule():
    """budget // (groups holding + 1) for a group that holds memory, except
    for a connection of it holding no frame (a batch buffer it claimed is the
    group's); a group holding nothing may take
    any room left; larger than the budget is never."""
    ix = _index(budget=120)
    first = dict(owner=0, conn=1)
    with _locked(ix):
        assert ix.grant(1, 121, 0, 1) is Grant.TOO_LARGE
        assert ix.grant(1, 50, 0, 1) is Grant.GRANTED
        ix.put(TRANSFER, size=50, group=1, **first)
        assert ix.grant(1, 20, 0, 1) is Grant.WAIT       # 70 > 120 // (1 + 1)
        assert ix.grant(1, 10, 0, 1) is Grant.GRANTED    # 60: exactly its share
        ix.put(TRANSFER, size=10, group=1, **first)
        assert ix.grant(1, 20, 0, 2) is Grant.GRANTED    # the group's other connection
        assert ix.grant(2, 40, 1, 1) is Grant.GRANTED    # a newcomer finds room
        newcomer = ix.put(BATCH, size=40, group=2, owner=1, conn=1)
        assert ix.grant(2, 1, 1, 1) is Grant.GRANTED     # a batch buffer it claimed is no frame
        ix.put(TRANSFER, size=1, group=2, owner=1, conn=1)
        assert ix.grant(2, 1, 1, 1) is Grant.WAIT        # 42 > 120 // (1 + 2): now it holds one
        assert ix.grant(1, 1, 0, 1) is Grant.WAIT
        assert ix.budget_stats()["holders"] == 2 and ix.budget_stats()["shm_bytes"] == 101
        ix.state[newcomer] = ORPHAN                   # counted, but nobody's share
        ix.group[newcomer] = 0
        assert ix.budget_stats()["holders"] == 2 and ix.budget_stats()["shm_bytes"] == 101
        assert ix.grant(3, 20) is Grant.WAIT          # 121 > 120: the orphan still counts


def test_a_dead_generations_rows_are_reclaimed_at_the_next_lock():
    ix = _index(cache=1 << 20)
    with _locked(ix, slot=0):
        gen = int(ix.generation[0])
        own = dict(owner=0, gen=gen, conn=7)
        conn = ix.put(CONN, group=5, **own)
        handed = ix.put(TRANSFER, pool=0, offset=0, size=4096, group=5, **own)
        reserved = ix.put(RESERVED, pool=-1, size=4096, group=5, **own)
        filling = ix.put(FILLING, pool=0, offset=4096, size=4096, **own)
        claimed = ix.put(BATCH, pool=0, offset=8192, size=4096, group=5, **own)
        other = ix.put(BATCH, pool=0, offset=12288, size=4096, group=6)
        cached = ix.put(CACHED, pool=0, offset=16384, size=4096)
        ix.pins[cached, 0] = 3
    ix.generation[0] += 1                         # the master reaped the worker
    with _locked(ix, slot=1, held=lambda pool, offset, size: True):   # clients still read
        assert ix.state[conn] == FREE and ix.state[reserved] == FREE
        assert ix.state[filling] == FREE
        assert ix.state[handed] == ORPHAN           # its client may still read it
        assert ix.state[claimed] == ORPHAN          # group 5 lost its last connection
        assert ix.state[other] == BATCH and ix.owner[other] == -1
        assert ix.pins[cached, 0] == 0 and ix.state[cached] == CACHED
        assert ix.reclaimed[0] == ix.generation[0]


def test_a_groups_buffers_live_while_it_has_a_connection():
    ix = _index()
    with _locked(ix, slot=0):
        gen = int(ix.generation[0])
        ix.put(CONN, group=5, owner=0, gen=gen, conn=1)
        ix.put(CONN, group=5, owner=1, gen=int(ix.generation[1]), conn=1)
        buffer = ix.put(BATCH, pool=0, offset=0, size=4096, group=5)
    ix.generation[0] += 1
    with _locked(ix, slot=1):
        assert ix.state[buffer] == BATCH            # slot 1's connection still lives


def test_orphans_are_freed_only_once_nobody_holds_them():
    ix = _index()
    held = {True}
    with _locked(ix):
        orphan = ix.put(ORPHAN, pool=0, offset=0, size=4096)
        assert ix.sweep(lambda p, o, s: bool(held)) == 0
        assert ix.state[orphan] == ORPHAN
        held.clear()
        assert ix.sweep(lambda p, o, s: bool(held)) == 1
        assert ix.state[orphan] == FREE


def test_the_master_sees_who_holds_the_lock_and_since_when():
    ix = _index()
    assert ix.lock.holder() is None
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with ix.lock.held(1, lambda: None):
            os.write(ready_w, b"x")
            time.sleep(30)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        assert ix.lock.holder() == pid
        assert 0 < ix.since[1] <= time.monotonic_ns()
        waited = []
        start = time.monotonic()

        def heartbeat() -> None:
            waited.append(time.monotonic())
            if time.monotonic() - start > 0.3:
                os.kill(pid, 9)             # the holder dies: the kernel drops its lock
        with ix.lock.held(0, heartbeat):
            assert waited, "a waiter keeps its heartbeat going"
        assert ix.since[0] == 0
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


@pytest.mark.parametrize("states", [(TRANSFER,), (BATCH, ORPHAN), (FILLING, CACHED)])
def test_rows_where_matches_every_state_asked(states):
    ix = _index()
    with _locked(ix):
        rows = {state: ix.put(state, group=1) for state in (CONN, TRANSFER, BATCH, RESERVED,
                                                             ORPHAN, FILLING, CACHED)}
    assert sorted(ix.rows_where(states)) == sorted(rows[s] for s in states)
