"""The btx family as it really runs, in both directions: its clients (btx,
pypca, maxie) against our server, our client and `psana-ipc stop` against
its server, its per-worker DONE loop, and clients killed mid-transfer."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from psana_ipc.client import Client, IPCRemotePsanaDataset, ServerError
from psana_ipc.client.stop import stop_server
from psana_ipc.protocol import PROTOCOL_VERSION, errors
from psana_ipc.protocol.address import parse_address
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected

from btx.fixtures import btx_server, start_btx_server  # noqa: F401 (fixtures)
from btx.iclient import IPCRemotePsanaDataset as BtxDataset
from btx.loops import load_without_nan_frames, send_done_per_worker
from btx.maxie import MaxieIPCDataset, collate_skipping_none
from psana1_standin.runs import EXP as PSANA1_EXP, RUN as PSANA1_RUN, STANDIN, raw_of, write_run
from conftest import ROOT, pid_alive, psana_ipc, worker_pids
from faulty_source import RAISE_EVENT, server_env

EVENTS = [RAISE_EVENT - 2, RAISE_EVENT - 1, RAISE_EVENT, RAISE_EVENT + 1]
GOOD = [e for e in EVENTS if e != RAISE_EVENT]


@pytest.fixture
def faulty(start_server):
    """A server whose source cannot read event RAISE_EVENT."""
    return start_server(["--source", "faulty", "--workers", "2"], env=server_env())


def _requests(events, det="epix100"):
    return [("x", 1, "idx", det, e) for e in events]


def _calib(events, det="epix100"):
    return np.stack([expected(det, "calib", e) for e in events])


# -- 1. errors every legacy client can read --------------------------------------------
def test_maxie_client_drops_the_event_that_cannot_be_read(faulty):
    loader = torch.utils.data.DataLoader(
        MaxieIPCDataset(parse_address(faulty.address), _requests(EVENTS)), batch_size=4,
        num_workers=2, collate_fn=collate_skipping_none)
    got = torch.cat(list(loader)).numpy()
    assert np.array_equal(got, _calib(GOOD))


def test_maxie_client_reads_an_error_without_a_frame(shared_server):
    ds = MaxieIPCDataset(parse_address(shared_server.address), _requests([1], det="no_such_detector"))
    assert ds[0] is None


@pytest.mark.parametrize("dataset_class", [BtxDataset, IPCRemotePsanaDataset], ids=["btx", "ours"])
def test_btx_loop_filters_the_nan_frame_of_an_unreadable_event(faulty, dataset_class):
    """btx's own client gets a NaN frame of the detector's shape; our dataset
    (the one-import change) over legacy or v1 raises the coded error instead."""
    address = parse_address(faulty.address)
    if dataset_class is BtxDataset:
        nan = BtxDataset(address, _requests([RAISE_EVENT]))[0]
        assert nan.shape == expected("epix100", "calib", 0).shape and np.isnan(nan).all()
        got = load_without_nan_frames(BtxDataset, address, _requests(EVENTS), 4, 2)
        assert np.array_equal(got, _calib(GOOD))
    for protocol in ("legacy", "v1"):
        ds = IPCRemotePsanaDataset(address, _requests(EVENTS), protocol=protocol)
        with pytest.raises(ServerError) as e:
            ds[2]
        assert e.value.code == errors.READ_FAILED and "corrupt on purpose" in e.value.message
        assert np.array_equal(ds[1], _calib([EVENTS[1]])[0])


def test_btx_loop_filters_the_events_psana1_returns_nothing_for(start_server, tmp_path):
    """psana1's detector returns None for events 0 and 4 of epix100a (no
    constants: calib is its 16-bit raw, narrower than a float32 NaN frame, and
    the first event cannot give the shape): btx's client gets NaN frames for
    those and its loop keeps every other frame, as against btx's own server."""
    write_run(tmp_path)
    server = start_server(["--source", "psana1", "--workers", "2"],
                          env={"PYTHONPATH": str(STANDIN), "SIT_PSDM_DATA": str(tmp_path)})
    requests = [(PSANA1_EXP, PSANA1_RUN, "idx", "epix100a", e) for e in range(6)]
    got = load_without_nan_frames(BtxDataset, parse_address(server.address), requests, 6, 2)
    assert np.array_equal(got, np.stack([raw_of("epix100a", e, gain_bits=False)
                                         for e in (1, 2, 3, 5)]))


def test_legacy_error_reply_carries_every_key_and_v1_keeps_its_code(shared_server):
    with socket.create_connection(parse_address(shared_server.address)) as sock:
        sock.sendall(json.dumps({"exp": "x", "run": 1, "detector_name": "nope",
                                 "event": 1}).encode())
        reply = json.loads(sock.recv(4096).decode())
    assert reply["code"] == errors.UNKNOWN_DETECTOR and "name" not in reply
    assert reply["error"] and errors.UNKNOWN_DETECTOR in reply["traceback"]
    with Client(shared_server.address) as c, pytest.raises(ServerError) as e:
        c.get("x", 1, "nope", 1)
    assert e.value.code == errors.UNKNOWN_DETECTOR


# -- inputs that once closed the connection with a traceback -------------------------------
def test_superscript_run_number_gets_an_error_reply(shared_server):
    with socket.create_connection(parse_address(shared_server.address)) as sock:
        sock.sendall(json.dumps({"exp": "x", "run": "\u00b2", "detector_name": "epix100",
                                 "event": 1}).encode())
        reply = json.loads(sock.recv(4096).decode())
    assert reply["code"] == errors.BAD_REQUEST
    assert "Traceback" not in shared_server.log()


def test_hello_with_a_lone_surrogate_token_gets_unauthorized(start_server, tmp_path):
    server = start_server(["--workers", "1", "--token-file", str(tmp_path / "token")])
    body = b'{"op": "hello", "id": 1, "version": %d, "token": "\\ud800"}' % PROTOCOL_VERSION
    with socket.create_connection(parse_address(server.address)) as sock:
        sock.sendall(struct.pack(">I", len(body)) + body)
        size = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0]
        reply = json.loads(sock.recv(size, socket.MSG_WAITALL))
    assert reply["code"] == errors.UNAUTHORIZED
    assert "Traceback" not in server.log()


# -- 2. psana-ipc stop against an old server ------------------------------------------------
def _stop_cli(address, *args):
    return psana_ipc("stop", "--address", f"{address[0]}:{address[1]}", *args)


@pytest.mark.parametrize("flags", [["--legacy"], []])
def test_stop_sends_done_to_every_worker_of_an_old_server(start_btx_server, flags):
    old = start_btx_server(5)
    workers = worker_pids(old.proc.pid)
    assert len(workers) >= 5
    done = _stop_cli(old.address, *flags, "--wait", "20", "--timeout", "3")
    assert done.returncode == 0, done.stderr
    assert "stopped" in done.stdout and "DONE" in done.stdout
    assert old.proc.wait(10) == 0
    assert not any(pid_alive(p) for p in workers)


def test_stop_reports_an_old_server_it_could_not_stop(start_btx_server):
    old = start_btx_server(2)
    pids = [old.proc.pid] + worker_pids(old.proc.pid)
    for pid in pids:      # frozen: connections queue, nobody reads a DONE
        os.kill(pid, signal.SIGSTOP)
    try:
        done = _stop_cli(old.address, "--legacy", "--wait", "2", "--timeout", "1")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert done.returncode == 1
    assert "still accepts connections" in done.stderr
    assert str(old.proc.pid) in done.stderr.split("still listening:")[1]


def test_stop_our_server_reports_the_shutdown_request(server):
    report = stop_server(parse_address(server.address), timeout=5, wait=20)
    assert report.stopped and report.dialect == "v1"
    assert server.proc.wait(30) == 0


def test_stop_legacy_sends_our_server_one_done(server):
    """Ours stops entirely on one DONE and says so: no DONE per worker, and the
    report waits for the listener to close (after the grace that absorbs old
    clients' remaining DONEs)."""
    report = stop_server(parse_address(server.address), legacy=True, timeout=5, wait=20)
    assert (report.stopped, report.dialect, report.done_sent) == (True, "legacy", 1)
    assert server.proc.wait(30) == 0
    assert "DONE received from a client: stopping" in server.log()


# -- 3. one DONE per worker -------------------------------------------------------------
@pytest.mark.parametrize("pause", [0.0, 0.15])
def test_btx_done_loop_completes_against_our_server(start_server, pause):
    server = start_server(["--workers", "5"])
    workers = server.workers
    send_done_per_worker(parse_address(server.address), 5, pause)   # raises if refused
    assert server.proc.wait(30) == 0
    assert not any(pid_alive(p) for p in workers)
    assert not list(our_segments(server.pid))


# -- 4. the probe ---------------------------------------------------------------------------
def test_probe_once_per_dataset_against_an_old_server(start_btx_server):
    old = start_btx_server(2)
    requests = _requests(range(6))
    ds = IPCRemotePsanaDataset(old.address, requests)
    assert ds.protocol == "legacy"           # decided before any worker forks
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    for _ in range(2):
        assert np.array_equal(torch.cat(list(loader)).numpy(), _calib(range(6)))
    log = old.log()
    assert "Unexpected error" not in log
    assert log.count("served ") == 1 + 2 * len(requests)     # the probe is one real request


def test_the_probe_reads_no_frame_on_our_server(server):
    ds = IPCRemotePsanaDataset(server.address, _requests([1, 2]))
    assert ds.protocol == "v1"
    with Client(server.address) as c:
        assert c.stats()["events"] == 0


def test_a_busy_v1_server_with_a_token_is_never_taken_for_an_old_one(start_server, tmp_path,
                                                                     monkeypatch):
    token_file = tmp_path / "token"
    server = start_server(["--workers", "1", "--cost-ms", "1500", "--token-file",
                           str(token_file)])
    monkeypatch.setenv("PSANA_IPC_TOKEN", token_file.read_text().strip())

    def read_slowly():
        with Client(server.address) as c:
            c.get("x", 1, "epix100", 0)
    busy = threading.Thread(target=read_slowly)
    busy.start()
    time.sleep(0.2)        # the only worker is inside a 1.5 s read
    ds = IPCRemotePsanaDataset(server.address, _requests([1, 2]))
    busy.join()
    assert ds.protocol == "v1"
    assert np.array_equal(ds[0], _calib([1])[0])


def test_a_wrong_legacy_guess_is_corrected(start_server, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    server = start_server(["--workers", "1", "--token-file", str(token_file)])
    monkeypatch.setenv("PSANA_IPC_TOKEN", token_file.read_text().strip())
    ds = IPCRemotePsanaDataset(server.address, _requests([1, 2]))
    ds.protocol = "legacy"         # as if the probe had gone wrong
    assert np.array_equal(ds[1], _calib([2])[0])
    assert ds.protocol == "v1"


# -- 5. clients killed mid-transfer ----------------------------------------------------------
KILLED_CLIENT = """
import sys, time
import numpy as np
from psana_ipc.client import legacy

def copy_slowly(view):          # stands for a copy a SIGTERM lands in the middle of
    print("copying", flush=True)
    time.sleep(60)
    return view.copy()

legacy.np = type("np", (), {"array": staticmethod(copy_slowly), "ndarray": np.ndarray,
                            "dtype": np.dtype})
legacy.fetch(("127.0.0.1", int(sys.argv[1])), "x", 1, "idx", "jungfrau4M", 3)
"""


def _old_segments():
    return {p for p in os.listdir("/dev/shm") if p.startswith("psm_")}


def test_our_legacy_client_killed_mid_copy_leaves_no_segment_of_an_old_server(btx_server):
    before = _old_segments()
    for _ in range(3):
        client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(btx_server[1])],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "copying"
        client.send_signal(signal.SIGTERM)          # what scancel sends
        assert client.wait(30) == -signal.SIGTERM
        client.stdout.close()
    assert _old_segments() == before                # while the old server still runs
