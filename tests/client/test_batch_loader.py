"""Every path the benchmark times, checked for bytes, order, sharding and
slot hygiene (never for speed)."""
import gc
import sys

import numpy as np
import torch

from psana_ipc.client import BatchLoader, Client
from psana_ipc.client.epoch_order import epoch_order
from psana_ipc.client.group import ConnectionGroup
from psana_ipc.server.sources.synthetic import expected

from conftest import ROOT, run_bench
from faulty_source.probes import wait_for


def _check(batch, events, det="epix100", mode="calib"):
    for row, e in zip(np.asarray(batch), events):
        assert np.array_equal(row, expected(det, mode, e))


def test_batches_hold_the_documented_bytes_in_order(shared_server):
    events = [7, 3, 3, 11, 0, 5, 9]
    loader = BatchLoader(shared_server.address, "x", 1, "epix100", "calib", events, batch_size=3)
    batches = [b.clone() for b in loader]
    assert [len(b) for b in batches] == [3, 3, 1]
    assert len(loader) == 3 and batches[0].dtype == torch.float32
    _check(torch.cat(batches), events)
    loader.close()


def test_numpy_flavour_and_fresh_buffers(shared_server):
    loader = BatchLoader(shared_server.address, "x", 1, "jungfrau4M", "raw", range(4), batch_size=2,
                         output="numpy", buffers=0)
    first, second = list(loader)
    assert isinstance(first, np.ndarray) and not np.shares_memory(first, second)
    _check(np.concatenate([first, second]), range(4), "jungfrau4M", "raw")
    loader.close()


def test_copied_batches_follow_the_lifetime_rule(shared_server):
    """On the copy path too: a batch kept is never overwritten, and a dropped
    one's buffer is reused once `buffers` newer batches were drawn."""
    loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(8), batch_size=2,
                         output="numpy", buffers=2, arenas=False)
    kept = list(loader)
    for k, batch in enumerate(kept):
        _check(batch, [2 * k, 2 * k + 1], mode="raw")
    assert not any(np.shares_memory(a, b) for i, a in enumerate(kept) for b in kept[i + 1:])
    addresses = [b.__array_interface__["data"][0] for b in loader]   # each dropped at once
    assert addresses[3] == addresses[0]
    loader.close()


def test_shuffle_is_seeded_per_epoch_and_shards_cover_every_event_once():
    events = list(range(10))
    e0 = epoch_order(events, 0, seed=4, shuffle=True, rank=0, world=1)
    assert sorted(e0) == events and e0 != events
    assert e0 == epoch_order(events, 0, seed=4, shuffle=True, rank=0, world=1)
    assert e0 != epoch_order(events, 1, seed=4, shuffle=True, rank=0, world=1)
    shards = [epoch_order(events, 2, 4, True, r, 3, padding="wrap") for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]                 # padded to equal length
    flat = sorted(sum(shards, []))
    assert set(flat) == set(events) and len(flat) == 12


def test_sharded_shuffled_loaders_read_what_their_order_says(shared_server):
    got = {}
    for rank in (0, 1):
        loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(9),
                             batch_size=2, shuffle=True, seed=1, rank=rank, world_size=2)
        loader.set_epoch(3)
        order = epoch_order(range(9), 3, 1, True, rank, 2)
        batch = torch.cat([b.clone() for b in loader])
        _check(batch, order, mode="raw")
        got[rank] = order
        loader.close()
    assert set(got[0]) | set(got[1]) == set(range(9))


def test_zero_copy_views_are_the_slots_and_are_released(server):
    loader = BatchLoader(server.address, "x", 1, "epix100", "calib", range(8), batch_size=4)
    for k, frames in enumerate(loader.views()):
        assert [f.event for f in frames] == list(range(4 * k, 4 * k + 4))
        for f in frames:
            assert not f.array.flags.writeable
            assert np.array_equal(f.array, expected("epix100", "calib", f.event))
    with Client(server.address) as c:    # releases reach the other workers asynchronously
        wait_for(lambda: c.stats()["frames_held"] == 0, "every frame released")
    loader.close()


def test_group_spreads_a_request_over_every_worker(server):
    group = ConnectionGroup(server.address)
    assert len(group.clients) == 2
    split = group.submit("x", 1, "epix100", [4, 5, 6], "raw")
    frames = dict(group.stream(split))
    assert sorted(frames) == [0, 1, 2]
    workers = {share.client.worker for share in split}
    assert len(workers) == 2, "both server workers produced frames"
    for pos, f in frames.items():
        assert np.array_equal(f.array, expected("epix100", "raw", 4 + pos))
        f.release()
    group.close()


def test_group_finds_every_worker_when_idle_connections_skew_the_count(server):
    idle = [Client(server.address).connect() for _ in range(4)]
    crowded = idle[0].worker
    for c in idle:                   # leave idle connections on one worker only
        if c.worker != crowded:
            c.close()
    group = ConnectionGroup(server.address)
    assert len({c.worker for c in group.clients}) == 2
    group.close()
    for c in idle:
        c.close()


def test_abandoning_a_loader_mid_epoch_frees_its_slots(server):
    loader = BatchLoader(server.address, "x", 1, "epix10k2M", "calib", range(40), batch_size=4,
                         depth=3, arenas=False)
    it = iter(loader)
    next(it)
    with Client(server.address) as c:
        assert c.stats()["frames_held"] > 0
        del it
        gc.collect()
        wait_for(lambda: c.stats()["frames_held"] == 0,
                 "the slots of an abandoned loader released")
    assert len(list(loader)) == 10          # it reconnects for the next epoch
    loader.close()


def test_bench_runs_and_writes_its_json(tmp_path):
    result, report = run_bench(tmp_path, "--detectors", "epix100", "--frames", "8",
                               "--repeats", "1", "--batch-size", "4",
                               "--plot", str(tmp_path / "bench.png"))
    assert result.returncode == 0, result.stderr
    rows = report["rows"]
    names = {r["name"] for r in rows}
    assert {"legacy", "dataset-w0", "batchloader", "zero-copy", "arena", "memcpy"} <= names
    for r in rows:
        assert set(r) >= {"name", "detector", "frames_per_s", "gb_per_s", "ratio_vs_legacy",
                          "fraction_of_memcpy"} and r["frames_per_s"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_against_a_checkout_pairs_every_pass_and_writes_its_json(tmp_path):
    """Against this same checkout (with the test's own python): each path's
    passes pair up, and the ratio is the median of the pairs'."""
    result, report = run_bench(tmp_path, "--against", str(ROOT), "--against-python",
                               sys.executable, "--detectors", "epix100", "--frames", "8",
                               "--batch-size", "4", "--pairs", "3", "--paths", "zero-copy",
                               "dataset-w0")
    assert result.returncode == 0, result.stderr
    assert [(r["path"], r["pairs"]) for r in report["rows"]] == [("zero-copy", 3),
                                                                  ("dataset-w0", 3)]
    for r in report["rows"]:
        assert min(r["this_fps"], r["other_fps"]) > 0
        assert 0 < r["lowest"] <= r["ratio"] <= r["highest"]
        assert 0 <= r["this_faster"] <= 3
        assert [len(fps) for fps in r["passes_fps"].values()] == [3, 3]
    assert "| zero-copy | epix100 |" in result.stdout


def test_bench_against_without_the_checkouts_python_says_so(tmp_path):
    result, _ = run_bench(tmp_path, "--against", str(tmp_path), "--detectors", "epix100")
    assert result.returncode != 0
    assert "--against needs a checkout and its python" in result.stderr


def test_bench_against_an_unknown_path_names_the_known_ones(tmp_path):
    result, _ = run_bench(tmp_path, "--against", str(ROOT), "--against-python", sys.executable,
                          "--paths", "zero-copy", "warp-drive")
    assert result.returncode != 0
    assert "no path warp-drive to compare" in result.stderr and "zero-copy" in result.stderr


def test_bench_frame_cache_runs_and_writes_its_json(tmp_path):
    result, report = run_bench(tmp_path, "--frame-cache", "--detectors", "epix100", "--frames",
                               "8", "--repeats", "1", "--batch-size", "4", "--cost-ms", "1")
    assert result.returncode == 0, result.stderr
    assert {"epoch 2+ (cached)", "two clients, one run", "epoch 1 + step + read-ahead",
            "dataset + step + read-ahead, epoch 1"} <= set(report["rows"])
    assert report["rows"]["two clients, one run"]["reads_per_event"] == 1.0
    assert report["rows"]["epoch 2+ (cached)"]["reads"] == 0
    ceilings = report["with_copies_fps"]
    assert report["workers_over_cost_fps"] > ceilings["1"] > ceilings["2"] > 0
    assert report["scan_lru_simulated"] == 0.0 and len(report["scan_hit_rate_by_epoch"]) == 3
