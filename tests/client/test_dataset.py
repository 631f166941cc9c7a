"""IPCRemotePsanaDataset in real DataLoaders (worker processes included)."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from psana_ipc.client import Client, IPCRemotePsanaDataset, RunDataset, ServerError
from psana_ipc.server.sources.synthetic import expected


def _requests(det, events):
    return [("xpptut15", 14, "idx", det, e) for e in events]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_over_v1(shared_server, num_workers):
    events = [5, 3, 8, 1, 0, 9, 2]
    ds = IPCRemotePsanaDataset(server_address=shared_server.address,
                               requests_list=_requests("epix10k2M", events))
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers)
    got = torch.cat(list(loader)).numpy()
    assert np.array_equal(got, np.stack([expected("epix10k2M", "calib", e) for e in events]))


def test_tuple_address_and_mode_as_btx_scripts_pass_them(shared_server):
    host, port = shared_server.address.rsplit(":", 1)
    ds = IPCRemotePsanaDataset((host, int(port)), _requests("jungfrau4M", [4]), mode="raw")
    assert len(ds) == 1
    assert np.array_equal(ds[0], expected("jungfrau4M", "raw", 4))
    assert ds.protocol == "v1"


def test_dataloader_with_shuffle_and_mixed_detectors(shared_server):
    requests = _requests("epix100", range(6)) + _requests("opal", range(3))
    ds = IPCRemotePsanaDataset(shared_server.address, requests, mode="raw")
    seen = {}
    for batch_idx, batch in enumerate(DataLoader(ds, batch_size=1, shuffle=True, num_workers=2)):
        frame = batch[0].numpy()
        for k, (_, _, _, det, e) in enumerate(requests):
            ref = expected(det, "raw", e)
            if frame.shape == ref.shape and np.array_equal(frame, ref):
                seen[k] = True
    assert len(seen) == len(requests)


def test_errors_surface_as_server_errors(shared_server):
    ds = IPCRemotePsanaDataset(shared_server.address, _requests("epix100", [10**6]))
    with pytest.raises(ServerError) as e:
        next(iter(DataLoader(ds, batch_size=1)))
    assert e.value.code == "out_of_range"


def test_run_dataset_covers_a_run_or_chosen_events(start_server):
    server = start_server(["--workers", "2", "--synthetic-events", "12"])
    whole = RunDataset(server.address, "x", 1, "epix100", mode="raw")
    assert len(whole) == 12
    got = torch.cat(list(DataLoader(whole, batch_size=5, num_workers=2))).numpy()
    assert np.array_equal(got, np.stack([expected("epix100", "raw", e) for e in range(12)]))
    some = RunDataset(server.address, "x", 1, "opal", mode="calib", events=[7, 2])
    assert np.array_equal(some[1], expected("opal", "calib", 2))


def test_default_collate_gives_every_slot_back(server):
    ds = IPCRemotePsanaDataset(server.address, _requests("epix100", range(30)), mode="raw")
    batches = list(DataLoader(ds, batch_size=10))
    assert len(batches) == 3
    for c in ds._group.clients:     # replies come in order: its releases are handled
        assert c.ping()
    with Client(server.address) as c:
        assert c.stats()["frames_held"] == 0
    ds.close()


def test_items_kept_by_a_collate_fn_are_never_overwritten(shared_server):
    """A collate_fn that keeps the items keeps their buffers: more batches than
    the connections' windows hold still all read back their own event."""
    events = list(range(150))
    ds = IPCRemotePsanaDataset(shared_server.address, _requests("epix100", events), mode="raw")
    kept = [item for batch in DataLoader(ds, batch_size=10, collate_fn=lambda b: b)
            for item in batch]
    capacity = sum(c.server_window() for c in ds._group.clients)
    assert len(kept) > capacity
    for item, e in zip(kept, events):
        assert np.array_equal(item, expected("epix100", "raw", e))
    ds.close()
