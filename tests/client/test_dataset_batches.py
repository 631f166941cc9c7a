"""DataLoader batches of IPCRemotePsanaDataset come from reused buffers:
bytes, order and the lifetime rule, with real DataLoader workers."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from psana_ipc.client import Client, IPCRemotePsanaDataset, RunDataset
from psana_ipc.server.sources.synthetic import expected

from conftest import in_pool, pool_place


def _dataset(server, events, **kw):
    return IPCRemotePsanaDataset(server.address, [("x", 1, "idx", "epix100", e) for e in events],
                                 mode="raw", **kw)


def _reference(events):
    return np.stack([expected("epix100", "raw", e) for e in events])


def _storage(batch):
    return batch.untyped_storage().data_ptr()


@pytest.mark.parametrize("loader_args", [
    dict(num_workers=0), dict(num_workers=0, pin_memory=True), dict(num_workers=2),
    dict(num_workers=2, pin_memory=True), dict(num_workers=2, persistent_workers=True),
    dict(num_workers=1, multiprocessing_context="spawn")])
def test_every_batch_holds_its_events_in_order(shared_server, loader_args):
    events = [11, 3, 7, 0, 42, 5, 9, 1, 30, 8, 2, 6, 4, 20]
    loader = DataLoader(_dataset(shared_server, events), batch_size=4, **loader_args)
    for epoch in range(2):
        got = [batch.numpy().copy() for batch in loader]
        assert [len(b) for b in got] == [4, 4, 4, 2]
        assert np.array_equal(np.concatenate(got), _reference(events))


def test_without_workers_batches_reuse_a_few_buffers_but_never_the_last_ones(server):
    ds = _dataset(server, range(40), buffers=2)
    pointers = [_storage(batch) for batch in DataLoader(ds, batch_size=4)]
    assert len(set(pointers)) <= 3 < len(pointers)
    assert all(a != b for a, b in zip(pointers, pointers[1:]))
    assert len(ds._ring) <= 3


def test_worker_batches_arrive_as_handles_to_buffers_mapped_once(server):
    """Batches cross from DataLoader workers as handles to the server's batch
    buffers, which the main process maps once each and the second epoch's
    workers fill again."""
    loader = DataLoader(_dataset(server, range(60)), batch_size=5, num_workers=2)
    held, addresses = [], {}
    for epoch in range(2):
        for batch in loader:
            assert in_pool(batch)
            place = pool_place(batch)
            held.append(place)
            assert addresses.setdefault(place, batch.data_ptr()) == batch.data_ptr()
            del batch
    assert len(held) == 24 and len(set(held)) <= 12
    assert set(held[12:]) & set(held[:12])      # the second epoch's workers reuse them


@pytest.mark.parametrize("num_workers", [0, 2])
def test_kept_batches_and_views_are_never_overwritten(shared_server, num_workers):
    """Code that keeps every batch (btx appends them all) or a view of one."""
    events = list(range(60))
    ds = _dataset(shared_server, events)
    kept, slices = [], []
    for k, batch in enumerate(DataLoader(ds, batch_size=5, num_workers=num_workers)):
        if k % 2:
            kept.append(batch)
        else:
            slices.append(batch[1:3].numpy())
        del batch
    ref = _reference(events).reshape(12, 5, *expected("epix100", "raw", 0).shape)
    assert all(np.array_equal(b.numpy(), ref[2 * k + 1]) for k, b in enumerate(kept))
    assert all(np.array_equal(s, ref[2 * k, 1:3]) for k, s in enumerate(slices))


def test_fresh_memory_for_every_batch_when_asked(shared_server):
    ds = _dataset(shared_server, range(20), buffers=0)
    batches = list(DataLoader(ds, batch_size=5))
    assert len({_storage(b) for b in batches}) == 4 and len(ds._ring) == 0
    assert np.array_equal(torch.cat(batches).numpy(), _reference(range(20)))


def test_run_dataset_batches_through_workers(start_server):
    server = start_server(["--workers", "2", "--synthetic-events", "30"])
    ds = RunDataset(server.address, "x", 1, "epix100", mode="raw")
    got = torch.cat([b.clone() for b in DataLoader(ds, batch_size=7, num_workers=2)]).numpy()
    assert np.array_equal(got, _reference(range(30)))


def test_the_btx_client_loop_unchanged(shared_server):
    """The seed's client loop: a dataset and a DataLoader per chunk, every batch kept."""
    exp, run, det_type = "x", 1, "epix100"
    all_data = []
    for event in range(0, 80, 40):
        requests_list = [(exp, run, 'idx', det_type, img) for img in range(event, event + 40)]
        dataset = IPCRemotePsanaDataset(server_address=shared_server.address,
                                        requests_list=requests_list)
        dataloader = DataLoader(dataset, batch_size=20, num_workers=10, prefetch_factor=None)
        for batch in iter(dataloader):
            all_data.append(batch)
    all_data = np.concatenate(all_data, axis=0)
    assert np.array_equal(all_data, np.stack([expected(det_type, "calib", e)
                                              for e in range(80)]))


def test_workers_whose_batch_buffers_fill_the_share_still_get_frames(start_server):
    """Two DataLoader workers' batch buffers fill more than the group's fair
    share of a small budget, and the last buffer finds no room: that worker
    copies frames instead, one at a time per connection, never refused."""
    server = start_server(["--workers", "2", "--synthetic-events", "40", "--shm-budget", "24M"])
    ds = RunDataset(server.address, "x", 1, "epix100", mode="raw")
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    for _ in range(2):
        got = torch.cat([b.clone() for b in loader]).numpy()
        assert np.array_equal(got, _reference(range(40)))


def test_dataloader_workers_learn_the_frames_spec_from_the_dataset(shared_server, monkeypatch):
    """Every epoch's new workers would otherwise each ask the server before
    their first batch: the dataset asks once when it is made, and forked
    workers inherit the answer."""
    events = list(range(8))
    ds = _dataset(shared_server, events)

    def asked(*args, **kwargs):
        raise AssertionError("a DataLoader worker asked the server for the frames' spec")
    monkeypatch.setattr(Client, "info", asked)
    batches = [b.clone() for b in DataLoader(ds, batch_size=4, num_workers=2)]
    assert np.array_equal(torch.cat(batches).numpy(), _reference(events))
    ds.close()
