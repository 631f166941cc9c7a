"""BatchLoader against a real server: its state is the consumed position (never what it asked ahead), and a resume on another number of ranks reads each remaining event once, in the epoch's global order, without reading anything again."""
import json

import pytest
from lockstep import lockstep

from psana_ipc.client import BatchLoader, Client
from psana_ipc.client.epoch_order import global_order
from psana_ipc.client.position import StateError, fingerprint

EVENTS = 30


def loaders(address, world, depth=3):
    return [BatchLoader(address, "x", 1, "epix100", "raw", range(EVENTS), batch_size=2,
                        shuffle=True, seed=11, rank=r, world_size=world, output="numpy",
                        depth=depth) for r in range(world)]


@pytest.fixture
def run_server(start_server):
    return start_server(["--workers", "2", "--synthetic-events", str(EVENTS)])


def _reads(address) -> int:
    with Client(address) as c:
        return c.stats()["events"]


@pytest.mark.parametrize("after", [3, 2, 1])
def test_resume_on_fewer_ranks_sees_every_event_once_in_the_global_order(run_server, after):
    first = loaders(run_server.address, 4, depth=1)     # nothing in flight when it stops
    for loader in first:
        loader.set_epoch(2)
    part = lockstep(first, steps=2)
    state = json.loads(json.dumps(first[0].state_dict()))
    assert (state["epoch"], state["events_done"], state["batches_done"]) == (2, 16, 2)
    for loader in first:
        loader.close()
    reads = _reads(run_server.address)
    second = loaders(run_server.address, after)
    for loader in second:
        loader.load_state_dict(state)
        loader.set_epoch(2)
    assert [len(loader) for loader in second] == \
        [-(-len(range(r, EVENTS - 16, after)) // 2) for r in range(after)]
    rest = lockstep(second)
    assert part + rest == [int(e) for e in global_order(EVENTS, 2, 11, True)]
    assert _reads(run_server.address) - reads == EVENTS - 16, "resuming read events again"
    assert second[0].state_dict()["epoch"] == 3
    for loader in second:
        loader.close()


def test_the_state_counts_batches_handed_over_not_those_asked_ahead(run_server):
    [loader] = loaders(run_server.address, 1)
    it = iter(loader)
    next(it)
    assert loader.state_dict()["events_done"] == 2         # three more are in flight
    next(it)
    assert loader.state_dict()["batches_done"] == 2
    loader.close()


def test_a_new_pass_without_a_loaded_position_is_the_whole_epoch(run_server):
    [loader] = loaders(run_server.address, 1)
    it = iter(loader)
    next(it)
    del it
    assert len(list(loader)) == 15
    loader.close()


def test_a_position_of_another_event_list_is_refused(run_server):
    [loader] = loaders(run_server.address, 1)
    state = loader.state_dict()
    other = BatchLoader(run_server.address, "x", 1, "epix100", "raw", range(1, EVENTS),
                        batch_size=2, shuffle=True, seed=11, output="numpy")
    with pytest.raises(StateError) as e:
        other.load_state_dict(state)
    assert e.value.code == "other_events"
    loader.close()
    other.close()


def test_another_event_list_has_its_own_order_from_the_epochs_start(run_server):
    [loader] = loaders(run_server.address, 1)
    loader.set_epoch(3)
    next(iter(loader))
    loader.events = range(10, 20)
    assert loader.epoch == 3 and len(loader) == 5
    assert sorted(lockstep([loader])) == list(range(10, 20))
    assert loader.state_dict()["fingerprint"] == fingerprint(range(10, 20))
    loader.close()
