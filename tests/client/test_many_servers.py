"""One loader or dataset over several servers on loopback: events spread over
the workers of all of them, bytes identical; a server lost mid-epoch is
left out and its frames come from the others; losing the last one is a
clear ConnectionError."""
import os
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from psana_ipc.client import BatchLoader, IPCRemotePsanaDataset, RunDataset
from psana_ipc.client.group import ConnectionGroup
from psana_ipc.protocol.address import parse_address, parse_addresses
from psana_ipc.protocol.shm_names import lock_name, segment_path
from psana_ipc.server.sources.synthetic import expected

from conftest import worker_pids

DET = "epix100"


def _lose(server) -> None:
    """A server's master and workers killed at once, as a node lost; then what
    `psana-ipc cleanup` would remove of it (its lock file)."""
    for pid in worker_pids(server.pid) + [server.pid]:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait()
    os.unlink(segment_path(lock_name(server.pid)))


def _identical(batches, events) -> bool:
    rows = np.concatenate([np.asarray(b) for b in batches])
    return len(rows) == len(events) and all(np.array_equal(row, expected(DET, "calib", e))
                                            for row, e in zip(rows, events))


def test_addresses_of_several_servers():
    assert parse_addresses("a:1, b:2") == [("a", 1), ("b", 2)]
    assert parse_addresses(["a:1", ("b", 2)]) == [("a", 1), ("b", 2)]
    assert parse_addresses(("a", 1)) == [("a", 1)]
    with pytest.raises(ValueError, match="names several servers"):
        parse_address("a:1,b:2")


@pytest.mark.parametrize("transport", ["auto", "inline"])
def test_a_loader_spreads_every_batch_over_the_workers_of_every_server(start_server,
                                                                       transport):
    a, b = start_server(["--workers", "2"]), start_server(["--workers", "1"])
    loader = BatchLoader(f"{a.address},{b.address}", "x", 1, DET, "calib", range(30), 6,
                         transport=transport, output="numpy")
    batches = [batch.copy() for batch in loader]
    workers = {c.worker for c in loader.group.clients}
    assert _identical(batches, range(30))
    assert workers == set(a.workers) | set(b.workers)
    loader.close()


def test_a_server_lost_mid_epoch_is_left_out_and_its_frames_come_from_the_other(start_server):
    a, b = start_server(["--workers", "2"]), start_server(["--workers", "2"])
    loader = BatchLoader([a.address, b.address], "x", 1, DET, "calib", range(40), 5,
                         output="numpy")
    batches = []
    for k, batch in enumerate(loader):
        batches.append(batch.copy())
        if k == 1:
            _lose(b)
    assert _identical(batches, range(40))
    assert [s.lost for s in loader.group.servers] == [False, True]
    assert _identical(list(loader), range(40))       # the next epoch, from the one left
    loader.close()


def test_a_server_that_stops_answering_is_left_out_after_the_timeout(start_server):
    a, b = start_server(["--workers", "1"]), start_server(["--workers", "1"])
    group = ConnectionGroup([a.address, b.address], timeout=2.0)
    assert len(group.clients) == 2
    frozen = worker_pids(b.pid) + [b.pid]
    for pid in frozen:                 # a node gone without closing its connections
        os.kill(pid, signal.SIGSTOP)
    try:
        frames = dict(group.stream(group.submit("x", 1, DET, range(6), "calib")))
        assert [s.lost for s in group.servers] == [False, True]
        assert _identical([frames[k].array[None] for k in range(6)], range(6))
        for frame in frames.values():
            frame.release()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        group.close()


def test_losing_every_server_says_so(start_server):
    a, b = start_server(["--workers", "1"]), start_server(["--workers", "1"])
    loader = BatchLoader([a.address, b.address], "x", 1, DET, "calib", range(40), 5)
    with pytest.raises(ConnectionError, match="the other servers .* were lost before"):
        for k, _ in enumerate(loader):
            if k == 1:
                _lose(b)
                _lose(a)
    loader.close()


def test_datasets_over_several_servers_in_a_dataloader(start_server):
    a, b = start_server(["--workers", "1"]), start_server(["--workers", "1"])
    both = [a.address, b.address]
    ds = IPCRemotePsanaDataset(both, [("x", 1, "idx", DET, e) for e in range(12)])
    batches = [batch.clone() for batch in DataLoader(ds, batch_size=4, num_workers=2)]
    assert _identical(batches, range(12))
    ds.close()
    run = RunDataset(",".join(both), "x", 1, DET, events=range(8))
    loader = DataLoader(run, batch_size=4)
    first = next(iter(loader)).clone()
    _lose(a)
    rest = [batch.clone() for batch in loader]
    assert _identical([first], range(4)) and _identical(rest, range(8))
    assert torch.equal(rest[0], first)
    run.close()
