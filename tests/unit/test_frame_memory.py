"""A worker's frame memory in-process: what a connection's released extents
become (kept for its next frames, never counted as frames held) and how
they give way to a frame that would wait for them."""
import pytest

from psana_ipc.client.pool import hold_range
from psana_ipc.server.frame_memory import FrameMemory, extent_size
from psana_ipc.server.pool_index import FREE, ORPHAN, Grant, Index
from psana_ipc.server.pool_pages import PAGE, PoolFile

FRAME = 3 * PAGE
EXTENT = extent_size(FRAME)


def _memory(budget: int) -> FrameMemory:
    memory = FrameMemory(Index(64, 2, budget, 0), [PoolFile(0, 16 * EXTENT)], slot=0)
    memory.start(lambda: None)
    return memory


@pytest.fixture
def memory():
    """One worker's memory over a pool whose budget holds one extent and a half."""
    memory = _memory(EXTENT + EXTENT // 2)
    yield memory
    memory.close()


def test_released_extents_are_kept_for_the_connections_next_frame(memory):
    grant, first = memory.take(1, 5, FRAME)
    assert grant is Grant.GRANTED
    memory.release(1, [first], keep=True)
    stats = memory.index.budget_stats()
    assert (stats["frames_held"], stats["kept_bytes"], stats["shm_bytes"]) == (0, EXTENT, EXTENT)
    grant, again = memory.take(1, 5, FRAME)
    assert (again.row, again.offset) == (first.row, first.offset)
    assert again.ticket != first.ticket
    stats = memory.index.budget_stats()
    assert (stats["frames_held"], stats["kept_bytes"]) == (1, 0)


def test_kept_extents_give_way_to_a_frame_that_would_wait(memory):
    memory.release(1, [memory.take(1, 5, FRAME)[1]], keep=True)
    grant, other = memory.take(2, 6, FRAME)          # the budget has room for one
    assert grant is Grant.GRANTED and other is not None
    assert not memory.keeps(1)
    stats = memory.index.budget_stats()
    assert (stats["kept_bytes"], stats["shm_bytes"], stats["frames_held"]) == (0, EXTENT, 1)


def test_kept_extents_go_back_when_dropped_or_not_kept(memory):
    memory.release(1, [memory.take(1, 5, FRAME)[1]], keep=True)
    memory.drop_kept(1)
    assert memory.index.budget_stats()["shm_bytes"] == 0
    memory.release(1, [memory.take(1, 5, FRAME)[1]], keep=False)
    assert memory.index.budget_stats()["shm_bytes"] == 0 and not memory.keeps(1)


def test_a_closed_connection_frees_what_it_kept_and_orphans_what_its_client_holds():
    memory = _memory(4 * EXTENT)
    memory.connect(1, 5)
    released, held = memory.take(1, 5, FRAME)[1], memory.take(1, 5, FRAME)[1]
    hold = hold_range(memory.pools[0].fd, held.offset, held.size)     # the client's
    memory.release(1, [released], keep=True)
    memory.disconnect(1, 5)
    states = memory.index.state
    assert (states[released.row], states[held.row]) == (FREE, ORPHAN)
    assert memory.index.budget_stats()["kept_bytes"] == 0
    hold.close()
    memory.close()
