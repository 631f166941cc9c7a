"""The budget bounds memory: the pages the server's pool holds stay within
it however many clients come and go (their frames reuse the same pages),
one client gets at most a fair share, inline frames count until sent, a
frame larger than the budget fails at once, and a frame waiting for memory
is read once."""
import socket
import threading

import numpy as np
import pytest

from psana_ipc.client import Client, ServerError, legacy
from psana_ipc.client.pool import FrameLost
from psana_ipc.protocol import errors
from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.protocol.messages import Get, RunKey
from psana_ipc.server.frame_memory import extent_size
from psana_ipc.server.sources.synthetic import expected

from faulty_source import server_env
from faulty_source.probes import (connect, hello, record_figure, run_in_private_shm, status_kb,
                                  wait_for)

EPIX100_RAW = extent_size(704 * 768 * 2)
MB = 1e6


def test_many_idle_clients_keep_the_pool_within_the_budget(pytestconfig):
    """24 clients each take a 1 MB frame and stay connected, mapping the pool,
    under an 8 MiB budget: the pool's pages (as the kernel counts them) never
    exceed the budget, and /dev/shm (its own tmpfs here) holds nothing of it."""
    report = run_in_private_shm("faulty_source.shm_peak", "64m", "idle", "24")
    assert report["served"] == 24
    assert report["peak"] <= report["budget"], report
    assert report["shm_peak"] == 0
    assert report["exit_code"] == 0 and report["at_end"] == 0
    record_figure(pytestconfig, f"pool pages with 24 idle clients: {report['peak'] / MB:.1f} MB "
                                f"of a {report['budget'] / MB:.1f} MB budget")


def test_a_greedy_client_cannot_starve_another(pytestconfig):
    """One client holds a window of 8 frames (8.6 MB, more than the 8 MiB
    budget) and never releases: it gets at most half the budget, and a second
    client is served meanwhile."""
    report = run_in_private_shm("faulty_source.shm_peak", "64m", "greedy", "5")
    assert report["served"] == 5, report
    assert report["hog_held_bytes"] <= report["budget"] // 2, report
    assert report["hog_refused"] == 1
    assert report["peak"] <= report["budget"], report
    assert report["exit_code"] == 0 and report["at_end"] == 0
    record_figure(pytestconfig, f"pool pages with a greedy client holding "
                                f"{report['hog_held']} frames and a second served: "
                                f"{report['peak'] / MB:.1f} MB of a {report['budget'] / MB:.1f} MB budget")


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
def test_a_frame_larger_than_the_budget_fails_naming_both_sizes(start_server, dialect):
    server = start_server(["--workers", "1", "--shm-budget", "1M"])
    opal_calib = 1024 * 1024 * 4
    with pytest.raises(ServerError) as e:
        if dialect == "v1":
            with Client(server.address) as c:
                c.get("x", 1, "opal", 1, "calib")
        else:
            legacy.fetch(parse_address(server.address), "x", 1, "idx", "opal", 1, "calib")
    assert e.value.code == errors.NO_MEMORY
    assert str(opal_calib) in e.value.message and str(1 << 20) in e.value.message
    assert "larger than the whole" in e.value.message


def test_an_inline_client_that_never_reads_holds_at_most_its_share(start_server):
    """Window 64 of 4.3 MB frames, never read: the worker keeps at most the
    connection's share of a 16 MiB budget (before: 64 frames, 277 MB), and
    another client is served meanwhile."""
    budget = 16 << 20
    server = start_server(["--workers", "1", "--shm-budget", str(budget), "--max-window", "64"])
    worker = server.workers[0]
    other = Client(server.address)
    other.get("x", 1, "epix10k2M", 0, "raw")         # the source is open: what follows is frames
    before = status_kb(worker, "RssAnon")
    sock = connect(server.address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert hello(sock, transport="inline", window=64)["ok"]
    sock.sendall(encode_frame(Get(RunKey("x", 1, "epix10k2M"), "raw",
                                  tuple(range(64))).to_header(1)))
    for e in range(3):
        assert np.array_equal(other.get("x", 1, "epix10k2M", e, "raw"),
                              expected("epix10k2M", "raw", e))
    stats = other.stats()
    grown = (status_kb(worker, "RssAnon") - before) * 1024
    assert 0 < stats["shm_bytes"] <= budget
    assert grown <= budget, f"worker grew by {grown / MB:.0f} MB"
    sock.close()
    other.close()


def test_a_frame_waiting_for_memory_is_read_once(start_server, tmp_path):
    """The faulty source cannot tell a frame's size ahead, so the server reads
    it first, then waits for room: every event is read exactly once (each read
    is logged by the source), however long it waited."""
    log = tmp_path / "reads.log"
    env = dict(server_env(), PSANA_IPC_TEST_READ_LOG=str(log))
    server = start_server(["--source", "faulty", "--workers", "1",
                           "--shm-budget", str(EPIX100_RAW + EPIX100_RAW // 2)], env=env)
    holder, waiter = Client(server.address), Client(server.address)
    got = {}
    with holder.view("x", 1, "epix100", 1, "raw"):
        thread = threading.Thread(target=lambda: got.update(
            frame=waiter.get("x", 1, "epix100", 2, "raw")))
        thread.start()
        thread.join(1.0)           # the waiter's frame waits for the held frame's room
    holder.ping()                  # carries the release
    thread.join(30)
    assert np.array_equal(got["frame"], expected("epix100", "raw", 2))
    assert log.read_text().split() == ["1", "2"]
    holder.close()
    waiter.close()


def test_released_frames_are_written_again_for_the_same_connection(start_server):
    """A connection that releases frames while more are queued gets its next
    frames in that memory again (with new tickets: a hold on an old one is
    refused), every frame the source's; once every frame is released, the
    memory kept for the connection's next frames is charged to the budget
    but no frame is held, and once nothing was queued for a while, the
    budget holds nothing."""
    server = start_server(["--workers", "1"])
    events = list(range(16))
    with Client(server.address, window=2) as client:
        places, tickets, first = set(), set(), None
        for frame in client.frames(client.submit("x", 1, "epix100", events, mode="raw")):
            with frame:
                assert np.array_equal(frame.array, expected("epix100", "raw", frame.event))
                where = frame.reply.where
                first = first or where
                places.add(where.offset)
                tickets.add(where.ticket)
        assert len(tickets) == len(events) and len(places) <= 3
        with pytest.raises(FrameLost):
            client.pools.hold(first.pool, first.offset, first.size, first.ticket)
        client.flush_releases()
        assert client.ping()
        stats = client.stats()
        assert stats["frames_held"] == 0 and stats["errors"] == {}
        assert stats["shm_bytes"] == stats["kept_bytes"] <= 2 * EPIX100_RAW
        wait_for(lambda: client.stats()["shm_bytes"] == 0, "kept memory given back")
        assert client.stats()["kept_bytes"] == 0
