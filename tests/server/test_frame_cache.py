"""`iserver --frame-cache`: hits are the bytes a fresh read gives and call
no source, entries handed to a client are never evicted under it, the cache
stays within its bound, two clients cost one read per event, read-ahead
fills the cache, no stop leaves anything behind, the eviction policy keeps
a share of a run larger than the cache where LRU keeps none, legacy
requests use it, a cache on disk is a file without a name, evicted
extents are reused, a node with no pages to give leaves a frame uncached,
and a cache larger than what /dev/shm has left takes none of it."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from psana_ipc.client import BatchLoader, Client, RunDataset
from psana_ipc.client.group import ConnectionGroup
from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol.messages import Get, RunKey
from psana_ipc.server import pool_pages
from psana_ipc.server.cache_policy import choose_victim, simulate
from psana_ipc.server.frame_cache import META_ROOM, FrameCache
from psana_ipc.server.frame_memory import FrameMemory
from psana_ipc.server.pool_index import Index
from psana_ipc.server.pool_pages import NoRoom, PoolFile, round_up
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected

from btx.iclient import IPCRemotePsanaDataset as BtxDataset
from conftest import pid_alive, psana_ipc, server_stats
from faulty_source.probes import run_in_private_shm, wait_for
from psana2_helpers import EVENTS, EXP, RUN, calib_of, psana_python

DET = "epix100"
RAW = 704 * 768 * 2                      # one epix100 raw frame
ENTRY = round_up(RAW + META_ROOM)        # what one cached raw frame takes
GET = Get(RunKey("x", 1, DET), "raw", (0,))


def test_hits_are_byte_identical_to_fresh_reads_and_call_no_source(start_server):
    fresh = start_server(["--workers", "1"])
    cached = start_server(["--workers", "2", "--frame-cache", "256M"])
    events = [4, 0, 9]
    for transport in ("shm", "inline"):
        with Client(fresh.address, transport=transport) as f, \
                Client(cached.address, transport=transport) as c:
            for mode in ("raw", "calib", "image", "mask"):
                for e in events:
                    want, want_desc = f.get_frame("x", 1, "epix10k2M", e, mode)
                    for _ in range(2):      # the first read fills, the second hits
                        got, desc = c.get_frame("x", 1, "epix10k2M", e, mode)
                        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
                        assert desc["timestamp"] == want_desc["timestamp"]
                        assert desc["calibrated"] == want_desc["calibrated"]
    stats = server_stats(cached)
    assert stats["events"] == 4 * len(events)          # one source read per frame
    assert stats["frame_cache"]["hits"] == 4 * len(events) * 3
    assert stats["frame_cache"]["misses"] == 4 * len(events)


def test_an_entry_held_by_one_client_is_not_evicted_by_another(start_server):
    server = start_server(["--workers", "2", "--frame-cache", str(3 * ENTRY)])
    with Client(server.address) as holder, Client(server.address) as other:
        held = [holder.view("x", 1, DET, e, "raw") for e in (0, 1)]
        for e in range(2, 12):
            assert np.array_equal(other.get("x", 1, DET, e, "raw"), expected(DET, "raw", e))
        cache = server_stats(server)["frame_cache"]
        assert cache["evictions"] >= 8 and cache["pinned"] == 2
        for e, frame in zip((0, 1), held):      # still there, still the same bytes
            assert np.array_equal(frame.array, expected(DET, "raw", e))
            frame.release()
        holder.flush_releases()
        reads = server_stats(server)["events"]
        for e in (0, 1):
            assert np.array_equal(holder.get("x", 1, DET, e, "raw"), expected(DET, "raw", e))
        assert server_stats(server)["events"] == reads        # both were still cached


def test_the_cache_stays_within_its_bound(start_server):
    limit = 4 * ENTRY + ENTRY // 2
    server = start_server(["--workers", "2", "--frame-cache", str(limit)])
    with Client(server.address) as c:
        for e in list(range(20)) + list(range(20)):
            c.get("x", 1, DET, e, "raw")
            assert c.stats()["frame_cache"]["bytes_held"] <= limit
        cache = c.stats()["frame_cache"]
    assert cache["bytes_held"] <= limit and cache["entries"] <= 4
    assert cache["evictions"] >= 40 - 4 - cache["hits"]


def test_two_clients_cost_one_source_read_per_event(start_server):
    """Both ask for the same events at once, on two workers: whoever comes
    second waits for the frame being cached instead of reading it again."""
    server = start_server(["--workers", "2", "--frame-cache", "256M", "--cost-ms", "5"])
    events = list(range(30))
    group = ConnectionGroup(server.address, 2)
    a, b = group.clients
    try:
        assert a.worker != b.worker
        ra = a.submit("x", 1, DET, events, "raw")
        rb = b.submit("x", 1, DET, events, "raw")
        for client, rid in ((a, ra), (b, rb)):
            for e, frame in zip(events, client.frames(rid)):
                with frame:
                    assert np.array_equal(frame.array, expected(DET, "raw", e))
        stats = a.stats()
    finally:
        group.close()
    assert stats["events"] == len(events)
    assert stats["frame_cache"]["hits"] + stats["frame_cache"]["misses"] == 2 * len(events)


def test_read_ahead_fills_the_cache_and_the_reads_then_hit(start_server):
    server = start_server(["--workers", "2", "--frame-cache", "256M"])
    with Client(server.address) as c:
        c.prefetch("x", 1, DET, list(range(10)), "raw")
        wait_for(lambda: c.stats()["frame_cache"]["read_ahead"] == 10, "10 frames read ahead")
        for e in range(10):
            assert np.array_equal(c.get("x", 1, DET, e, "raw"), expected(DET, "raw", e))
        stats = c.stats()
    assert stats["events"] == 10 and stats["frame_cache"]["hits"] == 10


def test_batch_loader_reads_ahead_and_epoch_two_reads_nothing(start_server):
    server = start_server(["--workers", "2", "--frame-cache", "256M"])
    events = list(range(24))
    loader = BatchLoader(server.address, "x", 1, DET, "calib", events, batch_size=4,
                         output="numpy", depth=1, read_ahead=8)
    for epoch in range(2):
        got = np.concatenate([b.copy() for b in loader])
        assert all(np.array_equal(row, expected(DET, "calib", e)) for row, e in zip(got, events))
        if epoch == 0:
            cache = server_stats(server)["frame_cache"]
            assert cache["read_ahead"] > 0
    loader.close()
    stats = server_stats(server)
    assert stats["events"] == len(events)
    assert stats["frame_cache"]["hits"] >= len(events)


def test_no_stop_leaves_anything_behind(start_server):
    """The cache is in the server's pool, which has no name: whatever way the
    server ends, /dev/shm holds nothing of it, and a frame the client held
    stays intact (the pool's memory goes with the last process mapping it)."""
    for how in ("sigterm", "worker killed", "master killed"):
        server = start_server(["--workers", "2", "--frame-cache", "64M"])
        workers = server.workers
        c = Client(server.address)
        held = c.view("x", 1, DET, 0, "raw")
        for e in range(1, 4):
            c.get("x", 1, DET, e, "raw")
        if how == "worker killed":       # its pin goes with it; the entries stay
            os.kill(c.worker, signal.SIGKILL)
            wait_for(lambda: server_stats(server)["frame_cache"]["pinned"] == 0, "no pin left")
            assert server_stats(server)["frame_cache"]["entries"] == 4
        if how == "master killed":
            server.proc.kill()
            server.proc.wait()
            wait_for(lambda: not any(pid_alive(p) for p in workers), "the workers gone")
            out = psana_ipc("cleanup")
            assert out.returncode == 0, out.stderr
        elif how == "sigterm":
            assert server.stop() == 0
        assert not our_segments(server.pid)
        assert np.array_equal(held.array, expected(DET, "raw", 0))
        held.release()
        c.close()


def test_the_policy_keeps_half_of_a_run_twice_the_cache_where_lru_keeps_nothing():
    trace = list(range(200)) * 3
    assert simulate(trace, 100, lru=True) == 0.0
    assert simulate(trace, 100) >= 0.3
    assert simulate(list(range(50)) * 3, 100) == simulate(list(range(50)) * 3, 100, lru=True)


def test_a_victim_is_never_a_pinned_or_unready_entry():
    evictable = np.array([False, True, False])
    last = np.array([0, 5, 1])
    assert choose_victim(evictable, last, np.zeros(3, int), np.ones(3, int), 10, 0) == 1
    assert choose_victim(np.zeros(3, bool), last, np.zeros(3, int), np.ones(3, int), 10, 0) is None


@pytest.mark.psana2
def test_on_psana2_epoch_two_calls_no_source_and_gives_the_same_frames(start_server,
                                                                      psana2_runs):
    server = start_server(psana2_runs.server_args(psana2_runs.calib_dir, workers=2)
                          + ["--frame-cache", "512M"], python=psana_python())
    loader = BatchLoader(server.address, EXP, RUN, "epix10k2M", "calib", batch_size=4,
                         output="numpy", shuffle=True, depth=1)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        order = loader._order()
        frames = np.concatenate([b.copy() for b in loader])
        epochs.append(dict(zip(order, frames)))
        if epoch == 0:
            reads = server_stats(server)["events"]
    loader.close()
    stats = server_stats(server)
    assert reads == EVENTS and stats["events"] == reads      # epoch 2: no psana read
    assert stats["frame_cache"]["hits"] >= EVENTS
    for e in range(EVENTS):
        assert epochs[1][e].tobytes() == epochs[0][e].tobytes()
        np.testing.assert_allclose(epochs[1][e], calib_of("epix10k2M", RUN, e), atol=1e-4)


def test_a_dataloader_reading_in_order_gets_read_ahead(start_server):
    server = start_server(["--workers", "2", "--frame-cache", "256M"])
    events = list(range(40))
    dataset = RunDataset(server.address, "x", 1, DET, "raw", events)
    for workers in (0, 2):
        got = torch.cat([b.clone() for b in DataLoader(dataset, batch_size=4,
                                                       num_workers=workers)])
        assert all(np.array_equal(row.numpy(), expected(DET, "raw", e))
                   for row, e in zip(got, events))
    dataset.close()
    stats = server_stats(server)
    assert stats["frame_cache"]["read_ahead"] > 0
    assert stats["events"] == len(events)


def test_the_btx_client_is_served_from_the_cache(start_server):
    """A legacy request whose frame is cached never calls the source; the
    frame still comes in a fresh segment, since btx unlinks what it is given."""
    server = start_server(["--workers", "2", "--frame-cache", "256M"])
    requests = [("x", 1, "idx", DET, e) for e in (3, 1, 3, 1)]
    ds = BtxDataset(parse_address(server.address), requests)
    for k, (_, _, _, _, e) in enumerate(requests):
        assert np.array_equal(ds[k], expected(DET, "calib", e))
    stats = server_stats(server)
    assert stats["events"] == 2
    assert stats["frame_cache"]["hits"] == 2 and stats["frame_cache"]["misses"] == 2
    with Client(server.address) as c:       # and v1 finds what legacy cached
        assert np.array_equal(c.get("x", 1, DET, 3, "calib"), expected(DET, "calib", 3))
    assert server_stats(server)["events"] == 2


def _unnamed_files_in(directory, pid: int) -> set:
    """The files a process has open in `directory` that have no name there."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/") and target.endswith("(deleted)"):
            found.add(target)
    return found


def test_a_cache_on_disk_serves_the_same_bytes_from_a_file_without_a_name(start_server,
                                                                         tmp_path):
    parent = tmp_path / "scratch"
    parent.mkdir()
    server = start_server(["--workers", "2", "--frame-cache", "64M",
                           "--frame-cache-dir", str(parent)])
    for transport in ("shm", "inline"):
        with Client(server.address, transport=transport) as c:
            for e in list(range(6)) * 2:
                assert np.array_equal(c.get("x", 1, DET, e, "raw"), expected(DET, "raw", e))
    stats = server_stats(server)
    assert stats["events"] == 6 and stats["frame_cache"]["hits"] == 18
    assert list(parent.iterdir()) == []                 # nothing anyone could open or plant
    assert all(len(_unnamed_files_in(parent, pid)) == 1 for pid in server.workers)
    assert not our_segments(server.pid)                 # nothing of the cache in /dev/shm
    server.proc.kill()                                  # however it ends
    server.proc.wait()
    assert list(parent.iterdir()) == []


def _in_process(limit: int, pool_size: int = 0):
    """A frame cache of `limit` in one process: one worker's handle."""
    index = Index(256, 1, 1 << 20, limit)
    memory = FrameMemory(index, [PoolFile(0, pool_size or limit + (1 << 20))], 0)
    memory.start(lambda: None)
    return FrameCache(memory, "test", 0)


def _filled(cache, event, nbytes=RAW):
    fill = cache.claim(cache.key(GET, event), nbytes)
    with cache.writing(fill) as allocate:
        allocate((nbytes,), np.dtype("u1"))[:] = event % 256
    entry = cache.commit(fill, {"event": event}, nbytes, pin=True)
    cache.unpin(entry)
    return entry


def test_evicted_extents_are_reused_within_the_bound():
    """Eviction frees extents that the next frames reuse, in place: the pages
    the cache has are what later frames get."""
    cache = _in_process(4 * ENTRY)
    entries = [_filled(cache, e) for e in range(12)]
    stats = cache.stats()
    assert stats["bytes_held"] <= 4 * ENTRY and stats["entries"] == 4
    assert stats["evictions"] == 8
    assert {e.offset for e in entries[4:]} <= {e.offset for e in entries[:4]}
    for entry in entries[-1:]:                          # the newest is intact
        assert cache.frame(entry).tobytes() == bytes([11]) * RAW
        assert cache.lookup(cache.key(GET, 11), pin=False).row == entry.row


def test_idle_workers_take_the_cache_memory_ahead(start_server):
    """Idle workers take the cache's pages, then each maps them all in."""
    server = start_server(["--workers", "2", "--frame-cache", "64M"])
    wait_for(lambda: server_stats(server)["frame_cache"]["ready_workers"] == 2,
             "the cache's memory taken ahead and mapped in by both workers")
    assert server_stats(server)["frame_cache"]["pool_bytes"] >= 64 << 20
    with Client(server.address) as c:
        for e in range(4):
            assert np.array_equal(c.get("x", 1, DET, e, "raw"), expected(DET, "raw", e))
        cache = c.stats()["frame_cache"]
    assert cache["pool_bytes"] >= 64 << 20 and cache["entries"] == 4


def _no_room(fd, offset, size):
    raise NoRoom(28, "no room")


def test_a_node_without_pages_leaves_the_frame_uncached_and_the_cache_as_it_was(monkeypatch):
    cache = _in_process(4 * ENTRY)
    kept = _filled(cache, 0)
    monkeypatch.setattr(pool_pages, "take", _no_room)
    assert cache.claim(cache.key(GET, 1), RAW) is None
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes_held"] == ENTRY
    monkeypatch.undo()
    again = _filled(cache, 1)
    assert again is not None and cache.frame(kept).tobytes() == bytes([0]) * RAW


def test_a_cache_larger_than_what_dev_shm_has_left_takes_none_of_it(pytestconfig):
    """Out of process, in a private 64 MiB /dev/shm of which another user's
    file takes 40: the cache (48M) is in the pool, not in /dev/shm; every
    frame of three passes over 32 MB is served with the right bytes, the
    cache keeps working by eviction, no worker dies, the other file is
    untouched and nothing of the server's is left."""
    report = run_in_private_shm("faulty_source.full_cache_shm", "64m")
    assert report["served"] == 90 and report["wrong"] == 0 and not report["refused"], report
    cache = report["cache"]
    assert cache["bytes_held"] <= 48 << 20 and report["shm_peak"] == 0, report
    assert cache["entries"] and cache["hits"], report
    assert report["source_reads"] == cache["misses"] < 90, report
    assert report["same_workers"] and report["exit_code"] == 0, report
    assert report["others_intact"] and report["left"] == [] and report["at_end"] == 0, report


def test_a_cache_larger_than_its_disk_is_refused(tmp_path):
    st = os.statvfs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "psana_ipc.server", "--port", "0",
                             "--frame-cache", str(st.f_frsize * st.f_blocks + (1 << 30)),
                             "--frame-cache-dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and "is more than" in result.stderr, result.stderr
