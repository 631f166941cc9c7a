"""The btx dialect: old clients against our server, our dataset against an old server."""
import json
import logging
import socket

import numpy as np
import pytest
import torch

from psana_ipc.client import IPCRemotePsanaDataset
from psana_ipc.protocol.address import parse_address
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected

from btx.fixtures import btx_server, start_btx_server  # noqa: F401 (fixtures)
from btx.iclient import IPCRemotePsanaDataset as BtxDataset
from conftest import pid_alive
from faulty_source.probes import wait_for


def test_btx_client_round_trip(shared_server):
    ds = BtxDataset(parse_address(shared_server.address),
                    [("xpptut15", 14, "idx", "epix10k2M", e) for e in (0, 5, 999)])
    for k, e in enumerate((0, 5, 999)):
        assert np.array_equal(ds[k], expected("epix10k2M", "calib", e))


def test_btx_client_through_dataloader(shared_server):
    requests = [("xpptut15", 14, "idx", "epix100", e) for e in range(12)]
    loader = torch.utils.data.DataLoader(BtxDataset(parse_address(shared_server.address), requests),
                                         batch_size=4, num_workers=2)
    batches = list(loader)
    got = torch.cat(batches).numpy()
    assert np.array_equal(got, np.stack([expected("epix100", "calib", e) for e in range(12)]))


def _legacy_request(address, **fields):
    sock = socket.create_connection(parse_address(address))
    body = {"exp": "x", "run": 1, "access_mode": "idx", "detector_name": "epix100", "event": 1,
            "mode": "raw"}
    body.update(fields)
    sock.sendall(json.dumps(body).encode())
    return sock, json.loads(sock.recv(4096).decode())


def test_segment_is_unlinked_after_ack_even_if_the_client_does_not(shared_server):
    sock, reply = _legacy_request(shared_server.address)
    assert reply["name"] in set(our_segments(shared_server.pid))
    sock.sendall(b"ACK")
    sock.close()
    _wait_gone(reply["name"])


def test_client_that_never_acks_loses_its_segment(start_server):
    server = start_server(["--workers", "1", "--ack-timeout", "0.5"])
    sock, reply = _legacy_request(server.address)
    _wait_gone(reply["name"])
    sock.close()
    with socket.create_connection(parse_address(server.address)):   # still serving
        pass
    assert np.array_equal(_fetch_ok(server.address, 4), expected("epix100", "raw", 4))


def test_client_that_vanishes_before_ack_loses_its_segment(shared_server):
    sock, reply = _legacy_request(shared_server.address)
    sock.close()
    _wait_gone(reply["name"])


def test_legacy_errors_are_json_replies(shared_server):
    sock, reply = _legacy_request(shared_server.address, detector_name="nope")
    sock.close()
    assert reply["code"] == "unknown_detector" and "name" not in reply


def _fetch_ok(address, event):
    from psana_ipc.client import legacy
    return legacy.fetch(parse_address(address), "x", 1, "idx", "epix100", event, "raw")


def _wait_gone(name):
    wait_for(lambda: name not in set(our_segments()), f"{name} unlinked")


def test_done_stops_every_worker(server):
    workers = server.workers
    assert len(workers) == 2
    with socket.create_connection(parse_address(server.address)) as sock:
        sock.sendall(b"DONE")
    assert server.proc.wait(30) == 0
    assert not any(pid_alive(p) for p in workers)
    assert not list(our_segments(server.pid))


@pytest.mark.parametrize("protocol", ["legacy", "auto"])
def test_our_dataset_against_an_old_btx_server(btx_server, protocol, caplog):
    requests = [("xpptut15", 14, "idx", "epix100", e) for e in range(6)]
    with caplog.at_level(logging.INFO, logger="psana_ipc.client.dataset"):
        ds = IPCRemotePsanaDataset(btx_server, requests, protocol=protocol)   # probes here
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=0)
        got = torch.cat(list(loader)).numpy()
    assert ds.protocol == "legacy"
    fallbacks = [r for r in caplog.records if "legacy dialect" in r.getMessage()]
    assert len(fallbacks) == (protocol == "auto")
    assert np.array_equal(got, np.stack([expected("epix100", "calib", e) for e in range(6)]))
