"""Faults with real processes and real signals: clients that die or stop
reading, workers that die or hang, sources that raise, a master killed with
its workers, shared memory that runs out. After each, the server serves on
and holds nothing it should not."""
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

from psana_ipc.client import BatchLoader, Client, ServerError, legacy
from psana_ipc.protocol import errors
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.protocol.shm_names import lock_name, segment_path
from psana_ipc.server.shm import our_segments
from psana_ipc.server.frame_memory import extent_size
from psana_ipc.server.sources.synthetic import expected

from conftest import pid_alive, psana_ipc, server_stats
from faulty_source import HANG_EVENT, RAISE_EVENT, server_env
from faulty_source.probes import (closed_by_server, connect, hello, run_in_private_shm,
                                  record_figure, status_kb, wait_for)

JUNGFRAU_RAW = 8 * 512 * 1024 * 2
MiB = 1 << 20


def _served(client, det="epix100", event=3, mode="raw"):
    return np.array_equal(client.get("x", 1, det, event, mode), expected(det, mode, event))


# -- clients ------------------------------------------------------------------------------
HOLDER = """
import json, sys
from psana_ipc.client import Client
c = Client(sys.argv[1])
held = [c.view("x", 1, "jungfrau4M", e, "raw") for e in range(3)]
stream = c.frames(c.submit("x", 1, "jungfrau4M", range(200), "raw"))
held += [next(stream), next(stream)]
print(json.dumps([f.reply.where.handle for f in held]), flush=True)
sys.stdin.read()
"""


def test_a_client_killed_mid_transfer_loses_its_frames(start_server):
    server = start_server(["--workers", "2", "--cost-ms", "5"])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, server.address],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        handles = json.loads(holder.stdout.readline())
        assert server_stats(server)["frames_held"] >= len(handles)
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: server_stats(server)["shm_bytes"] == 0, "the budget is given back")
    assert server_stats(server)["frames_held"] == 0
    with Client(server.address) as c:
        assert _served(c, "jungfrau4M", 7)


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_a_client_that_stops_reading_holds_at_most_its_window(start_server, transport):
    """It pipelines thousands of gets and never reads a reply: the server stops
    after `window` frames for it, its memory stays put, and others are served."""
    window = 4
    server = start_server(["--workers", "1"])
    worker = server.workers[0]
    with Client(server.address) as warm:      # the source's arrays exist before measuring
        assert _served(warm, "jungfrau4M", 0)
    rss_before = status_kb(worker, "VmRSS")
    stuck = connect(server.address)
    try:
        assert hello(stuck, transport=transport, window=window)["window"] == window
        gets = b"".join(encode_frame({"op": "get", "id": i, "exp": "x", "run": 1,
                                      "detector": "jungfrau4M", "mode": "raw",
                                      "events": list(range(100))}) for i in range(1, 31))
        stuck.sendall(gets)
        if transport == "shm":
            wait_for(lambda: server_stats(server)["frames_held"] == window, "the window is full")
        else:
            _wait_until_steady(server)
        stats = server_stats(server)
        assert stats["shm_bytes"] <= window * extent_size(JUNGFRAU_RAW)
        assert stats["events"] < 3000
        with Client(server.address) as other:
            assert _served(other, "jungfrau4M", 5) and _served(other)
        growth_kb = status_kb(worker, "VmRSS") - rss_before
        assert growth_kb * 1024 < window * JUNGFRAU_RAW + 64 * MiB
    finally:
        stuck.close()
    wait_for(lambda: server_stats(server)["shm_bytes"] == 0, "the stuck client's frames are freed")


def _wait_until_steady(server):
    """Until the served-event count stops moving (the peer's buffers are full)."""
    seen = []

    def steady():
        seen.append(server_stats(server)["events"])
        return len(seen) >= 5 and len(set(seen[-5:])) == 1
    wait_for(steady, "the server stops sending to a client that does not read")


def test_a_legacy_client_that_floods_instead_of_acking_costs_no_memory(start_server):
    server = start_server(["--workers", "1"])
    worker = server.workers[0]
    host, port = server.address.rsplit(":", 1)
    assert np.array_equal(legacy.fetch((host, int(port)), "x", 1, "idx", "epix100", 1, "raw"),
                          expected("epix100", "raw", 1))
    peak_before = status_kb(worker, "VmHWM")
    with connect(server.address) as sock:
        sock.sendall(json.dumps({"exp": "x", "run": 1, "detector_name": "epix100", "event": 2,
                                 "mode": "raw"}).encode())
        assert "name" in json.loads(sock.recv(4096))
        junk = b"\0" * MiB
        for _ in range(64):
            sock.sendall(junk)
        sock.sendall(b"ACK")
        assert closed_by_server(sock)
    assert (status_kb(worker, "VmHWM") - peak_before) * 1024 < 16 * MiB


def test_peers_that_reset_right_after_sending_cost_nothing(start_server):
    """The worker is busy in a slow source call while peers send a request and
    reset (RST): it finds their bytes, and no peer address, once it gets to them."""
    server = start_server(["--workers", "1", "--cost-ms", "300"])
    workers = server.workers
    with Client(server.address) as busy:
        rid = busy.submit("x", 1, "epix100", [1], "raw")
        legacy_request = json.dumps({"exp": "x", "run": 1, "detector_name": "epix100",
                                     "event": 2, "mode": "raw"}).encode()
        for first_bytes in (legacy_request, b"\x00\x00"):
            sock = connect(server.address)
            sock.sendall(first_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        for frame in busy.frames(rid):
            frame.release()
        assert _served(busy)
    assert server.workers == workers and "Traceback" not in server.log()


# -- workers --------------------------------------------------------------------------------
def _two_clients_on_two_workers(server, **kw):
    """(client, its worker, other client, its worker) on different workers."""
    first = Client(server.address, **kw)
    for _ in range(8):
        other = Client(server.address, **kw)
        if other.worker != first.worker:
            return first, first.worker, other, other.worker
        other.close()
    raise AssertionError("connections did not spread over the workers")


def test_a_worker_killed_mid_request_fails_that_request_cleanly(start_server):
    server = start_server(["--workers", "2", "--cost-ms", "10"])
    victim, dead, survivor, alive = _two_clients_on_two_workers(server)
    frames = victim.frames(victim.submit("x", 1, "opal", range(300), "raw"))
    next(frames).release()
    os.kill(dead, signal.SIGKILL)
    with pytest.raises(ConnectionError):
        for frame in frames:
            frame.release()
    assert _served(survivor, "opal", 9)
    wait_for(lambda: dead not in server.workers and len(server.workers) == 2,
             "a new worker replaces the dead one")
    wait_for(lambda: server_stats(server)["frames_held"] == 0,
             "the dead worker's frames given back")
    assert _served(victim, "opal", 11)          # the client connects afresh by itself
    assert pid_alive(alive) and _served(survivor)
    victim.close()
    survivor.close()


@pytest.fixture
def faulty_server(start_server):
    def start(*args):
        return start_server(["--source", "faulty"] + list(args), env=server_env())
    return start


def test_a_source_that_raises_fails_one_event_and_the_worker_lives(faulty_server):
    server = faulty_server("--workers", "1")
    workers = server.workers
    with Client(server.address) as c:
        with pytest.raises(ServerError) as e:
            c.get("x", 1, "epix100", RAISE_EVENT, "raw")
        assert e.value.code == errors.READ_FAILED and "corrupt on purpose" in e.value.message
        assert _served(c, event=RAISE_EVENT - 1)
        with pytest.raises(ServerError) as e:
            c.get_many("x", 1, "epix100", [RAISE_EVENT - 1, RAISE_EVENT, RAISE_EVENT + 1], "raw")
        assert e.value.code == errors.READ_FAILED
        assert _served(c, event=RAISE_EVENT + 1)
        host, port = server.address.rsplit(":", 1)
        with pytest.raises(ServerError) as e:
            legacy.fetch((host, int(port)), "x", 1, "idx", "epix100", RAISE_EVENT, "raw")
        assert e.value.code == errors.READ_FAILED
        assert c.stats()["errors"] == {errors.READ_FAILED: 3}
    assert server.workers == workers


def test_a_source_that_hangs_is_killed_by_the_watchdog(faulty_server):
    server = faulty_server("--workers", "2", "--request-timeout", "1")
    stuck, hung, other, alive = _two_clients_on_two_workers(server, timeout=120)
    outcome = []

    def ask_for_the_hanging_event():
        try:
            stuck.get("x", 1, "epix100", HANG_EVENT, "raw")
            outcome.append("answered")
        except Exception as e:   # what the caller of get() sees
            outcome.append(e)

    asker = threading.Thread(target=ask_for_the_hanging_event)
    asker.start()
    served = 0
    while asker.is_alive():
        assert _served(other, event=served % 10)
        served += 1
    asker.join()
    assert isinstance(outcome[0], ConnectionError), outcome
    assert served > 0 and pid_alive(alive)
    wait_for(lambda: hung not in server.workers and len(server.workers) == 2,
             "a new worker replaces the hung one")
    assert "spent over" in server.log()
    assert _served(stuck) and _served(other)
    stuck.close()
    other.close()


# -- the master -------------------------------------------------------------------------------
def test_a_frozen_worker_logs_its_traceback_and_is_replaced(start_server, pytestconfig):
    """A SIGSTOPped worker with a request pending: the master notices its loop
    stopped going round, has it log where it was, replaces it, and its client
    sees the connection close instead of waiting for its own timeout."""
    server = start_server(["--workers", "2", "--request-timeout", "2"])
    frozen, frozen_pid, other, _ = _two_clients_on_two_workers(server, timeout=120)
    os.kill(frozen_pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        frozen.get("x", 1, "epix100", 1, "raw")
    noticed = time.monotonic() - started
    wait_for(lambda: frozen_pid not in server.workers and len(server.workers) == 2,
             "a new worker replaces the frozen one")
    replaced = time.monotonic() - started
    log = server.log()
    assert f"worker {frozen_pid} made no progress" in log
    # faulthandler's dump, taken by the loop's own thread (never dumped while it runs on)
    assert "Current thread" in log, log
    assert "worker.py" in log.split("Current thread", 1)[1].split("\n\n")[0], log
    assert _served(frozen) and _served(other)
    record_figure(pytestconfig, f"frozen worker (SIGSTOP, --request-timeout 2): its client's "
                                f"connection closed after {noticed:.1f} s, traceback logged, "
                                f"a new worker in place after {replaced:.1f} s")
    frozen.close()
    other.close()


def test_a_server_started_with_sighup_ignored_keeps_serving_on_sighup(start_server, tmp_path):
    nohup = tmp_path / "nohup-python"
    nohup.write_text(f"#!/bin/sh\ntrap '' HUP\nexec {sys.executable} \"$@\"\n")
    nohup.chmod(0o755)
    server = start_server(["--workers", "2"], python=str(nohup))
    workers = server.workers
    for pid in [server.pid] + workers:
        os.kill(pid, signal.SIGHUP)
    with Client(server.address) as c:
        assert _served(c)
    assert server.proc.poll() is None and server.workers == workers


@pytest.mark.parametrize("listen", ["tcp", "unix"])
def test_after_the_whole_server_is_killed_cleanup_and_a_restart_start_clean(start_server,
                                                                          tmp_path, listen):
    args = ["--workers", "2"] + (["--unix", str(tmp_path / "s.sock")] if listen == "unix" else [])
    first = start_server(args)
    client = Client(first.address)
    held = client.view("x", 1, "epix10k2M", 1, "raw")
    workers = first.workers
    for pid in [first.pid] + workers:      # the OOM killer takes the whole group
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(10)
    wait_for(lambda: not any(pid_alive(p) for p in workers), "the workers are gone")
    assert not list(our_segments(first.pid))    # the pool had no name: nothing was left
    lock = segment_path(lock_name(first.pid))
    assert os.path.exists(lock)                 # the dead master's, no longer locked
    result = psana_ipc("cleanup")
    assert result.returncode == 0 and "removed" in result.stdout, result.stderr
    assert not list(our_segments(first.pid)) and not os.path.exists(lock)
    if listen == "tcp":
        args += ["--port", first.address.rsplit(":", 1)[1]]
    second = start_server(args)
    assert second.address == first.address
    with Client(second.address) as c:
        assert _served(c, "epix10k2M", 4)
        stats = c.stats()
    assert stats["events"] == 1 and stats["errors"] == {}
    # what the client held outlives the server
    assert np.array_equal(held.array, expected("epix10k2M", "raw", 1))
    del held
    client.close()


def test_a_client_goes_on_with_a_server_restarted_at_its_address(start_server, tmp_path):
    """The restarted server never issued the client's connection group id: the
    client's next request starts a new group, with a warning, and is served."""
    args = ["--workers", "2", "--unix", str(tmp_path / "s.sock")]
    first = start_server(args)
    client = Client(first.address)
    assert _served(client, "epix10k2M", 1)
    old_group = client.group
    first.stop()
    second = start_server(args)
    with pytest.warns(UserWarning, match="no longer knows connection group"):
        frame = client.get("x", 1, "epix10k2M", 2, "raw")
    assert np.array_equal(frame, expected("epix10k2M", "raw", 2))
    assert client.group not in (None, old_group)
    client.close()
    assert second.address == first.address


def test_a_loader_goes_on_with_a_server_restarted_at_its_address(start_server, tmp_path):
    """Its batch buffers went with the old server, and its connections follow
    the first one into the new group the restarted server issues (one
    warning): the next epoch is served in place, every frame the source's."""
    args = ["--workers", "2", "--unix", str(tmp_path / "s.sock")]
    first = start_server(args)
    events = list(range(12))
    loader = BatchLoader(first.address, "x", 1, "epix100", "raw", events, 4, output="numpy")
    assert sum(batch.shape[0] for batch in loader) == len(events)
    old_group = loader.group.group_id
    first.stop()
    start_server(args)
    with pytest.warns(UserWarning, match="no longer knows connection group") as warned:
        frames = np.concatenate([np.array(batch) for batch in loader])
    assert len(warned) == 1
    assert np.array_equal(frames, np.stack([expected("epix100", "raw", e) for e in events]))
    groups = {client.group for client in loader.group.clients}
    assert len(loader.group.clients) == 2 and groups == {loader.group.group_id} != {old_group}
    loader.close()


# -- shared memory running out ------------------------------------------------------------------
def test_a_budget_in_use_is_no_memory_until_a_frame_is_released(start_server):
    frame = extent_size(704 * 768 * 2)                   # one epix100 raw frame
    server = start_server(["--workers", "1", "--shm-budget", str(2 * frame + frame // 2)])
    first, second, third = (Client(server.address) for _ in range(3))
    with first.view("x", 1, "epix100", 1, "raw") as held:
        with second.view("x", 1, "epix100", 2, "raw"):
            with pytest.raises(ServerError) as e:
                third.get("x", 1, "epix100", 3, "raw")
            assert e.value.code == errors.NO_MEMORY
        assert second.ping()          # a release reaches the server with the next request
        assert _served(third)         # the frame it released made room
        assert np.array_equal(held.array, expected("epix100", "raw", 1))
    with pytest.raises(ServerError) as e:
        first.get("x", 1, "opal", 1, "calib")             # larger than the whole budget
    assert e.value.code == errors.NO_MEMORY
    stats = third.stats()
    assert stats["shm_peak_bytes"] <= stats["shm_budget"]
    assert stats["errors"] == {errors.NO_MEMORY: 2}
    for c in (first, second, third):
        c.close()


def test_a_frame_released_on_one_worker_makes_room_on_another(start_server):
    """One budget for all workers: the memory a frame released on one worker
    held serves a frame on another, in the same place of the pool."""
    frame = extent_size(704 * 768 * 2)                   # one epix100 raw frame
    server = start_server(["--workers", "2", "--shm-budget", str(frame + frame // 2)])
    first, first_worker, other, _ = _two_clients_on_two_workers(server)
    with first.view("x", 1, "epix100", 1, "raw") as held:
        place = held.reply.where.offset
    first.flush_releases()
    with other.view("x", 1, "epix100", 2, "raw") as frame_view:
        assert np.array_equal(frame_view.array, expected("epix100", "raw", 2))
        assert frame_view.reply.where.offset == place
    assert other.stats()["errors"] == {}
    for c in (first, other):
        c.close()


def test_a_full_dev_shm_refuses_only_legacy_segments_and_leaves_no_partial_one():
    """/dev/shm itself is too small, not the budget: server and client run in a
    mount namespace over a 2 MiB tmpfs, so the machine's /dev/shm is never
    touched. A v1 frame is in the pool and served; a legacy segment of 4 MiB
    is refused no_memory, and nothing half-made is left."""
    report = run_in_private_shm("faulty_source.small_shm", "2m")
    assert report["v1_served"] and report["legacy_code"] == errors.NO_MEMORY
    assert report["small_before"] and report["small_after"]
    assert report["after_v1"] == report["after_legacy"] == []
    assert report["exit_code"] == 0 and report["at_end"] == []
