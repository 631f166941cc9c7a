"""Starting, stopping and surviving: real processes, real signals."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from psana_ipc.client import Client
from psana_ipc.protocol.address import parse_address
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected

from conftest import pid_alive, psana_ipc, worker_pids


def test_ready_file_names_a_serving_address_and_goes_away(server):
    assert server.ready["pid"] == server.pid and len(server.ready["workers"]) == 2
    with Client(server.address) as c:
        assert c.ping()
    assert server.stop() == 0
    assert not server.ready_file.exists()


def test_psana_ipc_stop_stops_every_worker(server):
    workers = server.workers
    result = psana_ipc("stop", "--address", server.address)
    assert result.returncode == 0, result.stderr
    assert server.proc.wait(30) == 0
    assert workers and not any(pid_alive(p) for p in workers)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly_while_frames_are_held(server, sig):
    """A frame the client holds stays intact after the server stopped."""
    c = Client(server.address)
    held = c.view("x", 1, "epix10k2M", 1, "calib")
    workers = server.workers
    assert server.stop(sig) == 0
    assert not list(our_segments(server.pid))
    assert not any(pid_alive(p) for p in workers)
    assert np.array_equal(held.array, expected("epix10k2M", "calib", 1))
    del held
    c.close()


def test_a_killed_worker_is_replaced_and_others_keep_serving(start_server):
    server = start_server(["--workers", "2"])
    with Client(server.address) as survivor:
        assert survivor.ping()
        mine = survivor.server
        victim_conn = Client(server.address)
        victim_conn.view("x", 1, "epix100", 1, "raw")
        victim = victim_conn.worker
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(set(server.workers) - {victim}) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert victim not in server.workers
        with pytest.raises((ConnectionError, OSError)):
            victim_conn.get("x", 1, "epix100", 2, "raw")
        victim_conn.close()
        deadline = time.monotonic() + 10
        while survivor.stats()["frames_held"]:
            assert time.monotonic() < deadline, "the dead worker's frames were not given back"
            time.sleep(0.05)
        if mine:
            assert np.array_equal(survivor.get("x", 1, "epix100", 3, "raw"),
                                  expected("epix100", "raw", 3))
    assert "died" in server.log()


def test_cleanup_removes_what_a_killed_master_left(start_server):
    server = start_server(["--workers", "1"])
    c = Client(server.address)
    c.view("x", 1, "epix100", 0, "raw")
    workers = server.workers
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in workers):     # orphans notice the master is gone
        assert time.monotonic() < deadline, "workers outlived their master"
        time.sleep(0.1)
    c.close()
    result = psana_ipc("cleanup")
    assert result.returncode == 0, result.stderr
    assert not list(our_segments(server.pid))
    assert "removed" in result.stdout


def test_cleanup_keeps_segments_of_a_running_server(server):
    """A legacy segment not acknowledged yet survives `psana-ipc cleanup`."""
    with socket.create_connection(parse_address(server.address)) as sock:
        sock.sendall(json.dumps({"exp": "x", "run": 1, "detector_name": "epix100",
                                 "event": 0, "mode": "raw"}).encode())
        name = json.loads(sock.recv(4096))["name"]
        result = psana_ipc("cleanup")
        assert result.returncode == 0
        assert name in set(our_segments(server.pid))
        sock.sendall(b"ACK")


def test_a_worker_that_cannot_boot_stops_the_server(tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.run([sys.executable, "-m", "psana_ipc.server", "--port", "0",
                           "--workers", "1", "--ready-file", str(ready), "--window", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--window" in proc.stderr
    assert not ready.exists()


def test_busy_port_is_a_clear_error(shared_server):
    port = shared_server.address.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "psana_ipc.server", "--port", port],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "cannot listen" in proc.stderr


def test_iserver_help_explains():
    out = subprocess.run([sys.executable, "-m", "psana_ipc.server", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for option in ("--workers", "--source", "--ready-file", "--shm-budget", "--unix"):
        assert option in out


def test_stats_json_from_the_cli(shared_server):
    with Client(shared_server.address) as c:
        c.get("x", 1, "epix100", 1, "raw")
    result = psana_ipc("stats", "--json", "--address", shared_server.address)
    stats = json.loads(result.stdout)
    assert stats["events"] >= 1 and "shm_bytes" in stats and "frames_held" in stats


def test_cli_get_saves_npy_and_png(shared_server, tmp_path):
    out, png = tmp_path / "f.npy", tmp_path / "f.png"
    result = psana_ipc("get", "x", "1", "epix10k2M", "5", "--mode", "raw", "--out", str(out),
                        "--png", str(png), "--address", shared_server.address)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(out), expected("epix10k2M", "raw", 5))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_server_errors_with_their_code(shared_server):
    result = psana_ipc("get", "x", "1", "nope", "5", "--address", shared_server.address)
    assert result.returncode == 1 and "unknown_detector" in result.stderr


def test_orphaned_workers_exit(start_server):
    server = start_server(["--workers", "2"])
    workers = worker_pids(server.pid)
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in workers):
        assert time.monotonic() < deadline
        time.sleep(0.1)
