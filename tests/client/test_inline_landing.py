"""Frames that come inline are received straight into where they are kept
(the array `get` returns, `get_many`'s rows, a loader's or a dataset's batch
rows), byte-identical, with requests spread over every server worker."""
import numpy as np
import torch
from torch.utils.data import DataLoader

from psana_ipc.client import BatchLoader, Client, IPCRemotePsanaDataset
from psana_ipc.client.group import ConnectionGroup, rows_of
from psana_ipc.server.sources.synthetic import expected

DET = "epix100"


def test_get_and_get_many_receive_into_the_arrays_they_return(server):
    with Client(server.address, transport="inline") as c:
        frame = c.get("x", 1, DET, 3)
        assert frame.base is None and frame.flags.writeable     # its own memory, no copy of one
        assert np.array_equal(frame, expected(DET, "calib", 3))
        out = np.zeros((3,) + frame.shape, frame.dtype)
        assert c.get_many("x", 1, DET, [5, 1, 2], out=out) is out
    for row, event in zip(out, [5, 1, 2]):
        assert np.array_equal(row, expected(DET, "calib", event))


def test_a_split_lands_every_frame_in_its_row_over_every_worker(server):
    group = ConnectionGroup(server.address, transport="inline")
    assert len({c.worker for c in group.clients}) == 2
    batch = np.zeros((6,) + expected(DET, "raw", 0).shape, np.uint16)
    split = group.submit("x", 1, DET, [9, 8, 7, 6, 5, 4], "raw", land=rows_of(batch))
    assert len({share.client.worker for share in split}) == 2
    for pos, frame in group.stream(split):
        assert frame.landed and np.shares_memory(frame.array, batch[pos])
        frame.release()
    group.close()
    for row, event in zip(batch, [9, 8, 7, 6, 5, 4]):
        assert np.array_equal(row, expected(DET, "raw", event))


def test_a_row_that_does_not_fit_gets_memory_of_its_own(server):
    group = ConnectionGroup(server.address, transport="inline")
    wrong = np.zeros((2, 3), np.uint16)       # not the frame's shape
    split = group.submit("x", 1, DET, [1, 2], "raw", land=rows_of(wrong))
    frames = dict(group.stream(split))
    group.close()
    for pos, frame in frames.items():
        assert not frame.landed and not np.shares_memory(frame.array, wrong)
        assert np.array_equal(frame.array, expected(DET, "raw", 1 + pos))


def test_loader_and_dataset_batches_over_inline(server):
    loader = BatchLoader(server.address, "x", 1, DET, "calib", range(10), 4, transport="inline",
                         output="numpy")
    batches = [b.copy() for b in loader]
    loader.close()
    assert np.array_equal(np.concatenate(batches), np.stack([expected(DET, "calib", e)
                                                             for e in range(10)]))
    ds = IPCRemotePsanaDataset(server.address, [("x", 1, "idx", DET, e) for e in range(12)],
                               transport="inline")
    for workers in (0, 2):
        got = torch.cat([b.clone() for b in DataLoader(ds, batch_size=4, num_workers=workers)])
        for row, event in zip(got, range(12)):
            assert np.array_equal(row.numpy(), expected(DET, "calib", event))
    assert np.array_equal(ds[7], expected(DET, "calib", 7))
    ds.close()
