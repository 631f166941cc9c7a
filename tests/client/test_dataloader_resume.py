"""RunDataset in DataLoaders with real worker processes: ResumableDataLoader and torchdata's StatefulDataLoader over an ElasticSampler save the consumed position (not what workers fetched ahead) and resume it on another number of ranks, ResumableDataLoader also on another number of workers."""
import json

import pytest
from lockstep import event_of, lockstep
from torchdata.stateful_dataloader import StatefulDataLoader

from psana_ipc.client import ElasticSampler, ResumableDataLoader, RunDataset
from psana_ipc.client.epoch_order import global_order

EVENTS = 30
SEED = 5


@pytest.fixture
def dataset(start_server):
    server = start_server(["--workers", "2", "--synthetic-events", str(EVENTS)])
    ds = RunDataset(server.address, "x", 1, "epix100", mode="raw")
    yield ds
    ds.close()


def resumable(dataset, world, workers):
    return [ResumableDataLoader(dataset, batch_size=2, shuffle=True, seed=SEED, rank=r,
                                world_size=world, num_workers=workers) for r in range(world)]


def stateful(dataset, world, workers):
    return [StatefulDataLoader(dataset, batch_size=2, num_workers=workers,
                               sampler=ElasticSampler(dataset, shuffle=True, seed=SEED, rank=r,
                                                      world_size=world, batch_size=2))
            for r in range(world)]


def set_epoch(loaders, epoch):
    for loader in loaders:
        (loader.sampler if isinstance(loader, StatefulDataLoader) else loader).set_epoch(epoch)


@pytest.mark.parametrize("make, workers_before, workers_after", [
    (resumable, 2, 0), (resumable, 0, 1), (stateful, 1, 1)])
def test_resume_on_three_ranks_sees_every_event_once_in_the_global_order(
        dataset, make, workers_before, workers_after):
    first = make(dataset, 4, workers_before)
    set_epoch(first, 1)
    part = lockstep(first, steps=2)
    state = json.loads(json.dumps(first[0].state_dict()))
    del first
    second = make(dataset, 3, workers_after)
    for loader in second:
        loader.load_state_dict(state)
    set_epoch(second, 1)
    rest = lockstep(second)
    assert part + rest == [int(e) for e in global_order(EVENTS, 1, SEED, True)]


def test_the_state_is_what_was_handed_over_not_what_workers_fetched(dataset):
    [loader] = resumable(dataset, 1, 2)
    it = iter(loader)
    batch = next(it)
    assert loader.state_dict()["events_done"] == 2     # workers have fetched 4 batches ahead
    order = [int(e) for e in global_order(EVENTS, 0, SEED, True)]
    assert [event_of(f) for f in batch] == order[:2]
    del it


def test_a_stateful_loader_resumes_without_fetching_what_was_done(dataset):
    [loader] = stateful(dataset, 1, 0)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    del it
    [resumed] = stateful(dataset, 1, 0)
    resumed.load_state_dict(state)
    fetched = []
    original = dataset.__getitems__
    dataset.__getitems__ = lambda indices: fetched.append(list(indices)) or original(indices)
    try:
        first = next(iter(resumed))
    finally:
        del dataset.__getitems__
    order = [int(e) for e in global_order(EVENTS, 0, SEED, True)]
    assert [event_of(f) for f in first] == order[10:12]
    assert fetched == [order[10:12]], "the resume fetched events that were done"
