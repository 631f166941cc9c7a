"""Where new extents go in one process: the lowest (or, for batch buffers, the
highest) gap that holds them, never over another extent, batch buffers in
pages taken ahead before fresh ones, and which cache
entry gives way when no gap does (never a pinned one, never one a client
still holds)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from psana_ipc.server.pool_allocator import evict_one, first_fit, place
from psana_ipc.server.pool_index import CACHED, FREE, MEMORY, TRANSFER, Index

PAGE = 4096
POOL = 64 * PAGE


def NOBODY(pool: int, offset: int, size: int) -> bool:
    """No client holds anything."""
    return False


def _index(cache: int = POOL) -> Index:
    return Index(256, 2, POOL, cache)


def _extents(ix: Index):
    rows = ix.rows_where(MEMORY, pool=0)
    return sorted((int(ix.offset[r]), int(ix.offset[r] + ix.size[r])) for r in rows)


def test_the_lowest_gap_that_holds_it():
    ix = _index()
    ix.put(TRANSFER, pool=0, offset=0, size=2 * PAGE)
    ix.put(TRANSFER, pool=0, offset=3 * PAGE, size=PAGE)
    assert first_fit(ix, 0, POOL, PAGE) == 2 * PAGE
    assert first_fit(ix, 0, POOL, 2 * PAGE) == 4 * PAGE
    assert first_fit(ix, 0, POOL, 2 * PAGE, from_top=True) == POOL - 2 * PAGE
    assert first_fit(ix, 0, POOL, POOL) is None
    assert first_fit(ix, 1, POOL, POOL) == 0          # another pool's extents do not count


def test_a_batch_buffer_goes_to_the_top_of_the_pages_taken_ahead_first():
    """A frame cache's pages are taken bottom up while idle: a batch buffer
    goes where they exist (the top of them), and above them only once they
    have no gap that holds it; nothing is evicted to make room below."""
    ix = _index()
    taken = 16 * PAGE
    _entry(ix, 0, last=1, uses=1)
    first = place(ix, 0, POOL, 4 * PAGE, NOBODY, from_top=True, below=taken)
    assert first == taken - 4 * PAGE
    ix.put(TRANSFER, pool=0, offset=first, size=4 * PAGE)
    ix.put(TRANSFER, pool=0, offset=taken, size=PAGE)     # straddles nothing: above the pages
    assert place(ix, 0, POOL, 4 * PAGE, NOBODY, from_top=True, below=taken) == first - 4 * PAGE
    assert place(ix, 0, POOL, 12 * PAGE, NOBODY, from_top=True, below=taken) == POOL - 12 * PAGE
    assert ix.get("evictions") == 0
    assert place(ix, 0, POOL, 4 * PAGE, NOBODY) == PAGE    # small extents: bottom up as before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12), st.booleans()), max_size=60),
       st.integers(0, POOL))
def test_extents_never_overlap_and_stay_in_the_pool(steps, below):
    """Any sequence of placing (bottom up or top down, with any pages taken
    ahead) and giving back."""
    ix = _index()
    live = []
    for take, pages, from_top in steps:
        if take or not live:
            offset = place(ix, 0, POOL, pages * PAGE, NOBODY, from_top,
                           below=below)
            if offset is None:
                continue
            live.append(ix.put(TRANSFER, pool=0, offset=offset, size=pages * PAGE))
        else:
            ix.state[live.pop(pages % len(live))] = FREE
        extents = _extents(ix)
        assert all(0 <= lo < hi <= POOL for lo, hi in extents)
        assert all(a[1] <= b[0] for a, b in zip(extents, extents[1:]))


def _entry(ix: Index, offset: int, last: int, uses: int) -> int:
    row = ix.put(CACHED, pool=0, offset=offset, size=PAGE)
    ix.last[row], ix.uses[row] = last, uses
    return row


def test_eviction_spares_pinned_entries_and_entries_a_client_holds():
    ix = _index()
    pinned = _entry(ix, 0, last=1, uses=1)
    held = _entry(ix, PAGE, last=2, uses=1)
    free = _entry(ix, 2 * PAGE, last=3, uses=1)
    ix.pins[pinned, 1] = 1
    assert evict_one(ix, 0, lambda pool, offset, size: offset == PAGE)
    assert ix.state[free] == FREE and ix.state[held] == CACHED
    assert not evict_one(ix, 0, lambda pool, offset, size: offset == PAGE)
    assert ix.state[pinned] == CACHED and ix.get("evictions") == 1


def test_place_evicts_until_a_gap_holds_the_extent():
    ix = _index()
    for k in range(64):
        _entry(ix, k * PAGE, last=k, uses=1)
    offset = place(ix, 0, POOL, PAGE, lambda pool, offset, size: False)
    assert offset is not None
    assert ix.get("evictions") == 1
    assert offset == 63 * PAGE           # probationary entries: the newest goes first
