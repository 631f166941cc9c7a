"""Every change of the pool's index is safe at every instant a process can die:
a worker killed at each line of each operation (a child process ended there
with os._exit, which runs no clean-up) leaves no two extents sharing memory,
and once the master bumps its generation the next worker to take the lock
reclaims what it held: what it was writing freed, what it had handed out
orphaned while a client may still read it, its pins dropped."""
import os
import subprocess
import sys
from typing import Callable, Dict, Iterator

import numpy as np
import pytest

from psana_ipc.protocol.messages import Get, RunKey
from psana_ipc.server import frame_cache, frame_memory, pool_allocator, pool_index
from psana_ipc.server.frame_cache import FrameCache
from psana_ipc.server.frame_memory import FrameMemory
from psana_ipc.server.pool_index import FILLING, MEMORY, OWNED, Index
from psana_ipc.server.pool_pages import PoolFile

PAGE = 4096
POOL = 256 * PAGE
TRACED = {m.__file__ for m in (pool_index, pool_allocator, frame_memory, frame_cache)}
FINISHED, KILLED = 0, 9
GET = Get(RunKey("x", 1, "epix100"), "raw", (0,))


def _world() -> Dict:
    index = Index(256, 2, POOL // 2, POOL // 2)
    pools = [PoolFile(0, POOL)]
    return {"index": index, "pools": pools}


def _memory(world: Dict, slot: int) -> FrameMemory:
    memory = FrameMemory(world["index"], world["pools"], slot)
    memory.start(lambda: None)
    return memory


def _killed_at(line: int) -> Callable:
    """A tracer that ends the process at the `line`-th line run in the pool's
    modules (0: never)."""
    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == line:
                os._exit(KILLED)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename in TRACED else None
    return tracer


def _run_child(world: Dict, setup: Callable, operation: Callable, line: int) -> int:
    """Run `operation` in a child (slot 0), killed at `line`; its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            memory = _memory(world, 0)
            state = setup(memory)
            sys.settrace(_killed_at(line))
            operation(memory, state)
            sys.settrace(None)
        finally:
            os._exit(FINISHED)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _check(world: Dict, client_holds: bool) -> None:
    """After the master's bump: reclaimed, and no memory shared."""
    index = world["index"]
    index.generation[0] += 1
    survivor = _memory(world, 1)
    held = (lambda pool, offset, size: True) if client_holds else survivor.held
    with index.locked(1, lambda: None, held):
        rows = index.rows_where(MEMORY, pool=0)
        extents = sorted((int(index.offset[r]), int(index.offset[r] + index.size[r]))
                         for r in rows)
        assert all(0 <= lo < hi <= POOL for lo, hi in extents)
        assert all(a[1] <= b[0] for a, b in zip(extents, extents[1:])), extents
        owned = index.rows_where(OWNED)
        dead = owned[(index.owner[owned] == 0) & (index.gen[owned] != index.generation[0])]
        assert not dead.size, [int(index.state[r]) for r in dead]
        assert not index.pins[:, 0].any()
        assert index.cache_bytes() <= index.cache_limit
    extent = survivor.take(1, 9, PAGE)[1]          # and the pool still serves
    assert extent is not None
    survivor.close()


def _nothing(memory: FrameMemory):
    return None


def _full_cache(memory: FrameMemory):
    cache = FrameCache(memory, "test", 0)
    for event in range(40):
        fill = cache.claim(cache.key(GET, event), 2 * PAGE)
        with cache.writing(fill) as allocate:
            allocate((PAGE,), np.dtype("u1"))[:] = event
        cache.unpin(cache.commit(fill, {"shape": [PAGE], "dtype": "|u1"}, PAGE, pin=True))
    return cache


def _idle_buffer(memory: FrameMemory):
    memory.connect(1, 5)
    grant, extent = memory.batch(1, 5, 3 * PAGE)
    memory.free_batches((), 5)
    with memory.locked():
        memory.index.owner[extent.row] = -1          # its connection let it go
    return extent


def _kept_extent(memory: FrameMemory):
    """An extent a connection's client released while it had more queued."""
    memory.release(1, [memory.take(1, 5, 3 * PAGE)[1]], keep=True)


def _fill_and_serve(memory: FrameMemory, state) -> None:
    cache = FrameCache(memory, "test", 0)
    found = cache.claim(cache.key(GET, 99), 2 * PAGE)
    with cache.writing(found) as allocate:
        allocate((PAGE,), np.dtype("u1"))[:] = 7
    entry = cache.commit(found, {"shape": [PAGE], "dtype": "|u1"}, PAGE, pin=True)
    cache.unpin(entry)


def _claim_and_abandon(memory: FrameMemory, cache: FrameCache) -> None:
    fill = cache.claim(cache.key(GET, 1000), 3 * PAGE)
    cache.abandon(fill)


OPERATIONS = {
    "take a frame": (_nothing, lambda m, s: m.take(1, 5, 3 * PAGE)),
    "take and give back": (_nothing, lambda m, s: m.give(m.take(1, 5, 3 * PAGE)[1])),
    "reserve and give back": (_nothing, lambda m, s: m.unreserve(m.reserve(1, 5, PAGE)[1])),
    "take a kept extent again": (_kept_extent, lambda m, s: m.take(1, 5, 3 * PAGE)),
    "give kept extents back": (_kept_extent, lambda m, s: m.drop_kept(1)),
    "connect and disconnect": (_nothing, lambda m, s: (m.connect(1, 5), m.disconnect(1, 5))),
    "a new batch buffer": (_nothing, lambda m, s: (m.connect(1, 5), m.batch(1, 5, 5 * PAGE))),
    "claim an idle batch buffer": (_idle_buffer, lambda m, s: m.batch(1, 5, 3 * PAGE)),
    "give back a batch buffer": (_idle_buffer, lambda m, s: m.free_batches((s.ticket,), 5)),
    "fill a cache entry and serve it": (_nothing, _fill_and_serve),
    "fill a cache entry evicting others": (_full_cache, lambda m, s: _fill_and_serve(m, s)),
    "claim and abandon an entry": (_full_cache, _claim_and_abandon),
    "look up and pin an entry": (_full_cache,
                                 lambda m, s: s.lookup(s.key(GET, 3))),
    "sweep orphans": (_idle_buffer, lambda m, s: (m.free_batches((s.ticket,), 5), m.sweep())),
}


def killed_at_every_line(name: str) -> int:
    """Kill `name` at each of its lines in turn, checking the index after each
    death; returns how many lines it runs."""
    setup, operation = OPERATIONS[name]
    line = 1
    while True:
        world = _world()
        status = _run_child(world, setup, operation, line)
        assert status in (KILLED, FINISHED), status
        _check(world, client_holds=line % 2 == 0)
        if status == FINISHED:
            return line
        line += 1


@pytest.fixture(scope="module")
def killings() -> Iterator[Dict[str, subprocess.Popen]]:
    """Each operation's killings run in a process of their own, all started at
    once (they share nothing, and so the machine's cores share them): a fork per
    line costs a few milliseconds in a bare interpreter, and several times more
    from one that loaded torch."""
    started = {name: subprocess.Popen([sys.executable, __file__, name], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name in sorted(OPERATIONS)}
    yield started
    for child in started.values():
        if child.poll() is None:        # a test that failed before reading its child's end
            child.kill()
            child.communicate()


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_worker_killed_at_every_line_leaves_the_index_consistent(killings, name):
    out, err = killings[name].communicate(timeout=600)
    assert killings[name].returncode == 0, err
    lines = int(out)
    assert lines > 5, f"{name} ran only {lines} lines: the tracer did not reach it"


def test_killed_while_filling_an_entry_the_waiters_see_it_gone():
    """A fill a dead worker left is freed: another worker claims the key anew
    instead of waiting for it forever."""
    world = _world()
    status = _run_child(world, _nothing, lambda m, s: (
        FrameCache(m, "test", 0).claim(FrameCache(m, "test", 0).key(GET, 5), PAGE),
        os._exit(KILLED)), 0)
    assert status == KILLED
    index = world["index"]
    assert index.rows_where((FILLING,)).size == 1
    index.generation[0] += 1
    survivor = _memory(world, 1)
    cache = FrameCache(survivor, "test", 0)
    assert isinstance(cache.claim(cache.key(GET, 5), PAGE), frame_cache.Fill)
    assert index.rows_where((FILLING,)).size == 1       # this worker's, not the dead one's
    survivor.close()


if __name__ == "__main__":
    print(killed_at_every_line(sys.argv[1]))
