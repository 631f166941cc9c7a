#!/usr/bin/env python
"""Throughput of every way to get frames out of an iserver, measured in one run.

Starts its own server (synthetic source; `--cost-ms` burns that much CPU per
event, as psana does) and times, per detector, calib frames through:

  legacy        the btx dialect: IPCRemotePsanaDataset(protocol="legacy") in a
                DataLoader (a connection and a fresh segment per event)
  dataset-w0    IPCRemotePsanaDataset over v1, DataLoader num_workers=0
  dataset-w2    the same with num_workers=2 (new worker processes every pass)
  dataset-w2p   the same with persistent_workers=True
  batchloader   BatchLoader: requests in flight on every server worker, one
                copy per frame into a reused batch buffer
  zero-copy     BatchLoader.views(): the slots themselves, no client copy
  arena         BatchLoader over batch arenas: the server's workers write every
                frame in place, the batch is one contiguous tensor, no client copy
  collate-wN    DataLoader alone over frames already in memory (no server): the
                ceiling DataLoader itself puts on any dataset
  memcpy        one thread copying the same frames: the physical reference

`--resume` measures instead the time from making a loader to its first batch
(as a requeued job pays it): fresh at an epoch's start, resumed from a
position saved half-way through the epoch (`load_state_dict`), and, for
comparison, reaching that position by reading the first half again.

`--across-nodes` measures instead what crosses a network, each figure beside
a plain TCP stream of the same run (scripts/bench_across_nodes.py; root).

Each figure is the median of `--repeats` timed passes after one warm-up pass;
every pass of a path iterates the same DataLoader, as epochs of training do.
Prints a table (frames/s, GB/s, ratio to legacy, fraction of the memcpy
bandwidth, and CPU milliseconds per frame spent in this process and in the
server's workers over the timed passes) and the server's peak shared memory;
`--json` and `--plot` save the same. Example:

    python scripts/bench.py --json bench.json --plot bench.png
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from psana_ipc.client import (BatchLoader, Client, IPCRemotePsanaDataset, ResumableDataLoader,
                              RunDataset)
from psana_ipc.client.server_process import ServerProcess, child_pids
from psana_ipc.server.sources.synthetic import expected

import bench_across_nodes  # this directory's module


def cpu_seconds(pids: List[int]) -> float:
    """User + system CPU time of processes, from /proc (no psutil needed)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def live_children(server: int) -> Dict[int, float]:
    """CPU seconds of this process's live children other than the server
    (persistent DataLoader workers: os.times counts children once reaped)."""
    pids = set(child_pids(os.getpid()))
    pids.discard(server)
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_seconds([pid])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def client_cpu(server: int, since: Dict[int, float]) -> float:
    """This process's CPU, reaped children's, and live children's since `since`."""
    live = live_children(server)
    return sum(os.times()[:4]) + sum(t - since.get(pid, 0.0) for pid, t in live.items())


def timed(run: Callable[[], int], repeats: int,
          server: Optional[ServerProcess] = None) -> Dict[str, float]:
    """Median frames/s of `repeats` passes after one warm-up pass; with a
    server, also the CPU per frame of this process (DataLoader workers
    included) and of the server's workers."""
    run()
    rates, frames = [], 0
    if server is not None:
        children0 = live_children(server.pid)
        mine0, server0 = client_cpu(server.pid, children0), cpu_seconds(server.workers)
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
        frames += n
    result = {"fps": statistics.median(rates)}
    if server is not None:
        result.update(client_ms=1e3 * (client_cpu(server.pid, children0) - mine0) / frames,
                      server_ms=1e3 * (cpu_seconds(server.workers) - server0) / frames)
    return result


def dataset_pass(address: str, det: str, events: List[int], protocol: str, workers: int,
                 batch: int, persistent: bool = False) -> Callable[[], int]:
    requests = [("bench", 1, "idx", det, e) for e in events]
    ds = IPCRemotePsanaDataset(address, requests, mode="calib", protocol=protocol)
    held = {"loader": DataLoader(ds, batch_size=batch, num_workers=workers,
                                 persistent_workers=persistent)}

    def run() -> int:
        return sum(b.shape[0] for b in held["loader"])

    def close() -> None:
        """What the path holds on the server goes before the next path: the
        loader (and so its persistent workers), then the dataset's connections."""
        held.clear()
        ds.close()
    run.close = close
    return run


class InMemory(Dataset):
    """Frames already in this process: what DataLoader costs without any I/O."""

    def __init__(self, frames: np.ndarray, n: int) -> None:
        self.frames, self.n = frames, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.frames[i % len(self.frames)]


def collate_pass(det: str, n: int, workers: int, batch: int) -> Callable[[], int]:
    frames = np.stack([expected(det, "calib", e) for e in range(4)])

    def run() -> int:
        loader = DataLoader(InMemory(frames, n), batch_size=batch, num_workers=workers)
        return sum(b.shape[0] for b in loader)
    return run


def loader_pass(loader: BatchLoader, views: bool) -> Callable[[], int]:
    def run() -> int:
        if views:
            return sum(len(frames) for frames in loader.views())
        return sum(b.shape[0] for b in loader)
    return run


def in_place_pass(loader: BatchLoader) -> Callable[[], int]:
    """Batches written in place into arenas, which the loader gives back once timed."""
    run = loader_pass(loader, views=False)
    run.close = loader.close
    return run


def memcpy_pass(det: str, n: int, batch: int) -> Callable[[], int]:
    sources = np.stack([expected(det, "calib", e) for e in range(16)])
    out = np.empty((batch,) + sources.shape[1:], sources.dtype)

    def run() -> int:
        for k in range(n):
            np.copyto(out[k % batch], sources[k % len(sources)])
        return n
    return run


def bench_detector(server: ServerProcess, det: str,
                   args: argparse.Namespace) -> List[Dict]:
    address = server.address
    events = list(range(args.frames))
    frame_bytes = expected(det, "calib", 0).nbytes
    loader = BatchLoader(address, "bench", 1, det, "calib", events, args.batch_size,
                         arenas=False)
    in_place = BatchLoader(address, "bench", 1, det, "calib", events, args.batch_size,
                           arenas=True)
    paths = {
        "legacy": dataset_pass(address, det, events, "legacy", args.loader_workers,
                               args.batch_size),
        "dataset-w0": dataset_pass(address, det, events, "v1", 0, args.batch_size),
        f"dataset-w{args.loader_workers}": dataset_pass(address, det, events, "v1",
                                                        args.loader_workers, args.batch_size),
        f"dataset-w{args.loader_workers}p": dataset_pass(address, det, events, "v1",
                                                         args.loader_workers, args.batch_size,
                                                         persistent=True),
        "batchloader": loader_pass(loader, views=False),
        "zero-copy": loader_pass(loader, views=True),
        "arena": in_place_pass(in_place),
        "collate-w0": collate_pass(det, args.frames, 0, args.batch_size),
        f"collate-w{args.loader_workers}": collate_pass(det, args.frames, args.loader_workers,
                                                        args.batch_size),
        "memcpy": memcpy_pass(det, args.frames, args.batch_size),
    }
    measured = {}
    progress = tqdm(paths.items(), desc=det, unit="path", file=sys.stderr)
    for name, run in progress:
        progress.set_postfix_str(name)
        measured[name] = timed(run, args.repeats, server)
        progress.write(f"  {det} {name}: {measured[name]['fps']:.0f} frames/s", file=sys.stderr)
        getattr(run, "close", lambda: None)()
    loader.close()
    rows = []
    for name, m in measured.items():
        rows.append({"name": name, "detector": det, "frames_per_s": round(m["fps"], 1),
                     "gb_per_s": round(m["fps"] * frame_bytes / 1e9, 3),
                     "ratio_vs_legacy": round(m["fps"] / measured["legacy"]["fps"], 2),
                     "fraction_of_memcpy": round(m["fps"] / measured["memcpy"]["fps"], 3),
                     "client_cpu_ms_per_frame": round(m["client_ms"], 2),
                     "server_cpu_ms_per_frame": round(m["server_ms"], 2)})
    return rows


WARM_BATCHES = 3    # batches of events past the measured ones, read before a measured epoch


@contextlib.contextmanager
def running_server(args: argparse.Namespace, *options: str) -> Iterator[ServerProcess]:
    """A synthetic server with `--cost-ms` and these options, stopped on leaving;
    its runs have the measured events and WARM_BATCHES batches more."""
    server = ServerProcess(["--workers", str(args.server_workers), "--log-level", "WARNING",
                            "--cost-ms", str(args.cost_ms),
                            "--cost-kind", args.cost_kind or "burn", "--synthetic-events",
                            str(args.frames + WARM_BATCHES * args.batch_size), *options])
    try:
        yield server
        with Client(server.address) as c:
            c.shutdown()
        server.proc.wait(30)
    finally:
        server.stop()


# -- the frame cache (iserver --frame-cache) ---------------------------------------------------
@contextlib.contextmanager
def cache_server(args: argparse.Namespace, cache_bytes: int,
                 warm: bool = True) -> Iterator[ServerProcess]:
    """A server with a frame cache; `warm`: once its idle workers have taken
    the cache's memory and mapped it in, as a server started ahead of its job has."""
    with running_server(args, "--frame-cache", str(cache_bytes)) as server:
        while warm and _stats(server.address)["frame_cache"]["ready_workers"] \
                < args.server_workers:
            time.sleep(0.05)
        yield server


def _epoch(loader: Iterable, step_s: float = 0.0) -> float:
    """Frames/s of one pass, until its last batch arrived, sleeping `step_s`
    after each batch (a training step on a GPU): the step after the last
    batch overlaps nothing, and in a pass of ten batches would count a tenth
    of the pass as the loader's."""
    t0 = arrived = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch.shape[0]
        arrived = time.perf_counter()
        if step_s:
            time.sleep(step_s)
    return n / (arrived - t0)


def _epoch_cpu(loader: BatchLoader, server: ServerProcess,
               step_s: float = 0.0) -> Dict[str, float]:
    """Frames/s of one pass, and the CPU milliseconds per frame the server's
    workers spent on it (a steadier figure than frames/s on a shared node)."""
    before = cpu_seconds(server.workers)
    fps = _epoch(loader, step_s)
    spent = cpu_seconds(server.workers) - before
    return {"fps": fps, "server_ms": 1e3 * spent / len(loader.events)}


def _stats(address: str) -> Dict:
    with Client(address) as c:
        return c.stats()


def _cache_stats(address: str) -> Dict:
    stats = _stats(address)
    return dict(stats["frame_cache"], reads=stats["events"])


def _warmed(loader: BatchLoader, args: argparse.Namespace) -> BatchLoader:
    """The loader, after one pass over the WARM_BATCHES batches of events past
    the measured ones: each server worker has the run open and the loader's
    batch arenas (or buffers) have their pages, as after a job's first
    batches. What a job pays once stays out of the epochs compared; the
    measured events are still unread."""
    measured = loader.events
    loader.events = list(range(args.frames, args.frames + WARM_BATCHES * args.batch_size))
    _epoch(loader)
    loader.events = measured
    return loader


def bench_frame_cache(args: argparse.Namespace) -> Dict:
    """The frame cache through BatchLoader, on calib frames with `--cost-ms` of
    CPU per event, each case on a server of its own whose idle workers have
    taken the cache's memory first (but one, which starts at once), cold
    epochs the median of `--repeats` servers, every loader past its first
    batches (`_warmed`). BatchLoader's default path (batch arenas: the
    server writes or copies every frame into the batch) unless a row says
    `copy path` (the client copies each frame from its slot or its cache
    entry). Rows: an epoch without a cache (what the workers produce here
    and now: on a loaded node, less than workers / cost), also beside a
    training step (a sleep, as for a GPU) as long as one batch's production
    at workers / cost; a cold epoch, then warm ones; a cold epoch beside that
    step, without and with read-ahead; two clients reading one run at once;
    and the hit rate of a run twice the cache over three epochs, next to
    LRU's on the same trace (simulated) and this policy's simulated; and
    IPCRemotePsanaDataset in a DataLoader beside the same step, without a
    cache and with one that reads ahead (the dataset's sequential hints). The
    reference rows: memcpy, workers / cost, and workers / (cost + the time
    one thread takes to copy a frame once or twice): what two cores can
    give when each frame also costs that many copies and nothing else."""
    from psana_ipc.server.cache_policy import simulate
    det, n, batch = args.detectors[0], args.frames, args.batch_size
    frame_bytes = expected(det, "calib", 0).nbytes
    room = int(1.1 * (n + WARM_BATCHES * batch) * (frame_bytes + 8192))
    ideal = args.server_workers * 1000 / args.cost_ms
    step_s = batch * args.cost_ms / 1e3 / args.server_workers
    rows: Dict[str, Dict] = {}

    def loader(address: str, read_ahead: int = 0, arenas: bool = True,
               warm: bool = True) -> BatchLoader:
        made = BatchLoader(address, "bench", 1, det, "calib", list(range(n)), batch,
                           read_ahead=read_ahead, output="numpy", arenas=arenas)
        return _warmed(made, args) if warm else made

    def median(passes: List[Dict[str, float]]) -> Dict[str, float]:
        return {k: statistics.median(p[k] for p in passes) for k in passes[0]}

    with running_server(args) as server:
        for name, arenas in (("no cache", True), ("no cache, copy path", False)):
            plain = loader(server.address, arenas=arenas)
            rows[name] = median([_epoch_cpu(plain, server) for _ in range(args.repeats)])
            if arenas:
                rows["no cache + step"] = median([_epoch_cpu(plain, server, step_s)
                                                  for _ in range(args.repeats)])
            plain.close()

    def cold(warm: bool = True, step: float = 0.0, ahead: int = 0,
             arenas: bool = True) -> Dict[str, float]:
        """One cold epoch, on a fresh server each of `--repeats` times: the medians."""
        passes = []
        for _ in range(args.repeats):
            with cache_server(args, room, warm) as server:
                first = loader(server.address, ahead, arenas)
                passes.append(dict(_epoch_cpu(first, server, step),
                                   read_ahead=_cache_stats(server.address)["read_ahead"] / n))
                first.close()
        return {k: v for k, v in median(passes).items() if k != "read_ahead" or ahead}

    rows["epoch 1 (cold)"] = cold()
    rows["epoch 1 (cold), copy path"] = cold(arenas=False)
    rows["epoch 1 (cold, memory taken meanwhile)"] = cold(warm=False)
    with cache_server(args, room) as server:
        address = server.address
        epochs = loader(address)
        _epoch(epochs)
        before = _cache_stats(address)
        warm = [_epoch(epochs) for _ in range(args.repeats)]
        after = _cache_stats(address)
        epochs.close()
        rows["epoch 2+ (cached)"] = {"fps": statistics.median(warm),
                                     "hit_rate": (after["hits"] - before["hits"]) / len(warm) / n,
                                     "reads": after["reads"] - before["reads"]}
    rows["epoch 1 + step"] = cold(step=step_s)
    rows["epoch 1 + step + read-ahead"] = cold(step=step_s, ahead=8)

    def dataset_step(cached: bool) -> Dict[str, float]:
        """IPCRemotePsanaDataset in a DataLoader (num_workers=0), as btx scripts
        use it, with the step: no pipeline of its own, so without read-ahead
        the source's time and the step add up. Medians of fresh servers."""
        passes = []
        for _ in range(args.repeats):
            with (cache_server(args, room) if cached else running_server(args)) as server:
                for events, step in ((range(n, n + WARM_BATCHES * batch), 0.0),
                                     (range(n), step_s)):
                    ds = IPCRemotePsanaDataset(server.address, [("bench", 1, "idx", det, e)
                                                                for e in events], mode="calib")
                    fps = _epoch(DataLoader(ds, batch_size=batch), step)
                    ds.close()
                passes.append(fps)
        return {"fps": statistics.median(passes)}

    rows["dataset + step, no cache"] = dataset_step(cached=False)
    rows["dataset + step + read-ahead, epoch 1"] = dataset_step(cached=True)
    with cache_server(args, room) as server:
        address = server.address
        pair, rates = [loader(address, 8, warm=False) for _ in range(2)], []
        threads = [threading.Thread(target=lambda lo=lo: rates.append(_epoch(lo))) for lo in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for lo in pair:
            lo.close()
        rows["two clients, one run"] = {"fps": sum(rates),
                                        "reads_per_event": _cache_stats(address)["reads"] / n}
    capacity, hits = n // 2, []
    with cache_server(args, capacity * (frame_bytes + 8192)) as server:
        address = server.address
        scan = loader(address, warm=False)
        for _ in range(3):
            before = _cache_stats(address)["hits"]
            _epoch(scan)
            hits.append((_cache_stats(address)["hits"] - before) / n)
        scan.close()
    trace = list(range(n)) * 3
    memcpy = timed(memcpy_pass(det, n, batch), args.repeats)["fps"]
    for name, row in rows.items():      # against the no-cache path in the same conditions
        same = ("dataset + step, no cache" if name.startswith("dataset") else
                "no cache + step" if "+ step" in name else
                "no cache, copy path" if "copy path" in name else "no cache")
        row["of_no_cache"] = row["fps"] / rows[same]["fps"]
    copy_ms = 1e3 / memcpy
    return {"rows": rows, "memcpy_fps": memcpy, "workers_over_cost_fps": ideal,
            "with_copies_fps": {k: args.server_workers * 1e3 / (args.cost_ms + k * copy_ms)
                                for k in (1, 2)},
            "frame_mb": frame_bytes / 1e6, "step_ms": 1e3 * step_s, "cost_ms": args.cost_ms,
            "server_workers": args.server_workers, "frames": n,
            "scan_cache_frames": capacity, "scan_hit_rate_by_epoch": hits,
            "scan_policy_simulated_by_epoch": [simulate(trace[:k * n], capacity) * k
                                               - simulate(trace[:(k - 1) * n], capacity) * (k - 1)
                                               for k in (1, 2, 3)],
            "scan_lru_simulated": simulate(trace, capacity, lru=True)}


# -- new consumers: what a new loader, client or epoch pays ----------------------------------
def _first_batch_ms(address: str, det: str, events: List[int], batch: int) -> float:
    """From constructing a BatchLoader to its first batch in hand."""
    t0 = time.perf_counter()
    loader = BatchLoader(address, "bench", 1, det, "calib", events, batch, output="numpy")
    next(iter(loader))
    spent = time.perf_counter() - t0
    loader.close()
    return 1e3 * spent


def _fresh_loader_pass(address: str, det: str, events: List[int],
                       batch: int) -> Callable[[], int]:
    """A new BatchLoader for every epoch, as a script that makes one per epoch does."""
    def run() -> int:
        loader = BatchLoader(address, "bench", 1, det, "calib", events, batch, output="numpy")
        n = sum(b.shape[0] for b in loader)
        loader.close()
        return n
    return run


def _user_epoch(args: argparse.Namespace, *options: str) -> float:
    """A cold epoch as a user starts it: a server of its own, a loader made
    `--user-wait` seconds after the server is ready, one pass: frames/s."""
    with running_server(args, *options) as server:
        time.sleep(args.user_wait)
        loader = BatchLoader(server.address, "bench", 1, args.detectors[0], "calib",
                             list(range(args.frames)), args.batch_size, output="numpy")
        fps = _epoch(loader)
        loader.close()
    return fps


def _frames_are_the_sources(loader: BatchLoader, det: str) -> bool:
    """One more pass of an unshuffled loader: every frame as the source made it."""
    event = 0
    for batch in loader:
        for frame in batch:
            if not np.array_equal(frame, expected(det, "calib", loader.events[event])):
                return False
            event += 1
    return event == len(loader.events)


def _second_client(args: argparse.Namespace, wait: float, cache: str) -> Dict:
    """Two loaders on a server with a frame cache of `cache` bytes, made
    `wait` s after it is ready: frames/s of the first one's epoch (which
    fills the cache) and of the second one's (every frame a hit), medians of
    `--repeats`, and whether the second one's frames are the source's."""
    firsts, seconds, same = [], [], True
    for _ in range(args.repeats):
        with running_server(args, "--frame-cache", cache) as server:
            time.sleep(wait)
            loaders = [BatchLoader(server.address, "bench", 1, args.detectors[0], "calib",
                                   list(range(args.frames)), args.batch_size, output="numpy")
                       for _ in range(2)]
            firsts.append(_epoch(loaders[0]))
            seconds.append(_epoch(loaders[1]))
            same = same and _frames_are_the_sources(loaders[1], args.detectors[0])
            for loader in loaders:
                loader.close()
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {"first epoch": first, "second client": second, "x first": second / first,
            "bytes identical": same}


def bench_new_consumers(args: argparse.Namespace) -> Dict:
    """What a new consumer pays, all in one run: the legacy dialect (btx's
    design through this server: a connection and a fresh segment per event),
    one BatchLoader reused for every epoch, a new BatchLoader every epoch, the
    time from making a BatchLoader to its first batch on a server that served
    before; with `--cost-ms` of CPU per event, a second client on a run the
    frame cache holds against the first epoch, and a cold epoch as a user
    starts it (a loader made `--user-wait` s after the server is ready) with a
    frame cache against without. Medians of `--repeats`."""
    det, batch = args.detectors[0], args.batch_size
    events = list(range(args.frames))
    plain = argparse.Namespace(**dict(vars(args), cost_ms=0.0))
    rows: Dict[str, Dict] = {}
    with running_server(plain, "--shm-budget", args.shm_budget) as server:
        address = server.address
        rows["legacy"] = timed(dataset_pass(address, det, events, "legacy",
                                            args.loader_workers, batch), args.repeats, server)
        reused = BatchLoader(address, "bench", 1, det, "calib", events, batch, output="numpy")
        rows["one loader, every epoch"] = timed(loader_pass(reused, views=False), args.repeats,
                                                server)
        reused.close()
        rows["a new loader every epoch"] = timed(_fresh_loader_pass(address, det, events, batch),
                                                 args.repeats, server)
        first_ms = statistics.median(_first_batch_ms(address, det, events, batch)
                                     for _ in range(max(3, args.repeats)))
    for row in rows.values():
        row["x_legacy"] = row["fps"] / rows["legacy"]["fps"]
    reused_fps = rows["one loader, every epoch"]["fps"]
    for row in rows.values():
        row["of_reused"] = row["fps"] / reused_fps
    result: Dict = {"rows": rows, "first_batch_ms": first_ms, "frames": args.frames,
                    "batch": batch, "detector": det}
    if args.cost_ms:
        cached = argparse.Namespace(**dict(vars(args), frames=args.cache_frames))
        room = str(int(1.2 * (args.cache_frames + WARM_BATCHES * batch)
                       * (expected(det, "calib", 0).nbytes + 8192)))
        result["second_client"] = {
            "server ready before": _second_client(cached, args.user_wait, args.user_cache),
            "server started just now": _second_client(cached, 0.0, room)}
        without = statistics.median(_user_epoch(cached) for _ in range(args.repeats))
        with_cache = statistics.median(_user_epoch(cached, "--frame-cache", args.user_cache)
                                       for _ in range(args.repeats))
        result["user_epoch_fps"] = {"without cache": without, "with cache": with_cache}
    return result


def print_head(*columns: str) -> None:
    """A markdown table's header: the first column, `path` and `other` read as text, the
    rest as numbers (right-aligned)."""
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" if k == 0 or name in ("path", "other") else "---:"
                            for k, name in enumerate(columns)) + " |")


def print_consumers_table(result: Dict) -> None:
    print(f"{result['detector']} calib, {result['frames']} frames a pass, batches of "
          f"{result['batch']}")
    print_head("path", "frames/s", "x legacy", "of one loader")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['fps']:.0f} | {r['x_legacy']:.1f} | {100 * r['of_reused']:.0f}% |")
    print(f"first batch of a new loader (warm server): {result['first_batch_ms']:.1f} ms")
    for server, r in result.get("second_client", {}).items():
        print(f"frame cache, {server}: first epoch {r['first epoch']:.0f} frames/s, a second "
              f"client {r['second client']:.0f} frames/s ({r['x first']:.1f}x), bytes "
              f"{'identical' if r['bytes identical'] else 'DIFFERENT'}")
    if "user_epoch_fps" in result:
        user = result["user_epoch_fps"]
        print(f"cold epoch as a user starts it: without cache {user['without cache']:.0f} "
              f"frames/s, with cache {user['with cache']:.0f} frames/s "
              f"({100 * user['with cache'] / user['without cache']:.0f}%)")


# -- resuming mid-epoch (state_dict / load_state_dict) -------------------------------------------
def _close(loader) -> None:
    (loader.dataset if isinstance(loader, ResumableDataLoader) else loader).close()


def _first_batch_s(make: Callable[[], object], state: Optional[Dict] = None,
                   skip: int = 0) -> float:
    """Seconds from making a loader (as a restarted job does) to the batch it
    goes on with: after loading `state`, or after reading `skip` batches."""
    t0 = time.perf_counter()
    loader = make()
    if state is not None:
        loader.load_state_dict(state)
    batches = iter(loader)
    for _ in range(skip + 1):
        next(batches)
    elapsed = time.perf_counter() - t0
    del batches
    _close(loader)
    return elapsed


def _state_half_way(make: Callable[[], object], batches: int) -> Dict:
    loader = make()
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    del it
    _close(loader)
    return state


def bench_resume(args: argparse.Namespace) -> Dict:
    """Time to the first batch, fresh and resumed half-way, for BatchLoader and
    for RunDataset in a ResumableDataLoader with `--loader-workers` workers."""
    det, events = args.detectors[0], list(range(args.frames))
    half = args.frames // args.batch_size // 2
    result = {"detector": det, "cost_ms": args.cost_ms, "resumed_at_batch": half, "rows": {}}
    with running_server(args) as server:
        makers = {
            "BatchLoader": lambda: BatchLoader(server.address, "x", 1, det, "calib", events,
                                               batch_size=args.batch_size, shuffle=True),
            f"ResumableDataLoader, {args.loader_workers} workers": lambda: ResumableDataLoader(
                RunDataset(server.address, "x", 1, det, events=events), args.batch_size,
                shuffle=True, num_workers=args.loader_workers)}
        for name, make in makers.items():
            state = _state_half_way(make, half)
            _first_batch_s(make)                                      # warm-up
            row = {case: 1e3 * statistics.median(_first_batch_s(make, **kw)
                                                  for _ in range(args.repeats))
                   for case, kw in (("fresh_ms", {}), ("resumed_ms", {"state": state}),
                                    ("reread_ms", {"skip": half}))}
            result["rows"][name] = row
    return result


def print_resume_table(result: Dict) -> None:
    print(f"time to the first batch, {result['detector']} calib, cost {result['cost_ms']} ms "
          f"per event, resumed at batch {result['resumed_at_batch']}")
    print_head("loader", "fresh ms", "resumed ms", "resumed ÷ fresh", "reading up to it again ms")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['fresh_ms']:.1f} | {r['resumed_ms']:.1f} | "
              f"{r['resumed_ms'] / r['fresh_ms']:.2f} | {r['reread_ms']:.1f} |")


def print_cache_table(result: Dict) -> None:
    """The rows as a markdown table (the README's), then the scan figures."""
    memcpy, ideal = result["memcpy_fps"], result["workers_over_cost_fps"]
    print_head("path", "frames/s", "of memcpy", "of workers/cost", "of no cache", "other")
    for name, r in result["rows"].items():
        other = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k not in ("fps", "of_no_cache"))
        print(f"| {name} | {r['fps']:.1f} | {100 * r['fps'] / memcpy:.0f}% | "
              f"{100 * r['fps'] / ideal:.0f}% | {100 * r['of_no_cache']:.0f}% | {other} |")
    print(f"| memcpy (one thread) | {memcpy:.1f} | 100% | | | |")
    print(f"| workers / cost | {ideal:.1f} | | 100% | | |")
    for k, fps in result["with_copies_fps"].items():
        print(f"| workers / (cost + {k} cop{'y' if k == 1 else 'ies'}) | {fps:.1f} | | "
              f"{100 * fps / ideal:.0f}% | | |")
    for key in ("frame_mb", "cost_ms", "server_workers", "frames", "step_ms", "scan_cache_frames",
                "scan_hit_rate_by_epoch", "scan_policy_simulated_by_epoch", "scan_lru_simulated"):
        value = result[key]
        value = [round(v, 3) for v in value] if isinstance(value, list) else round(value, 3)
        print(f"{key}: {value}")


def print_table(rows: List[Dict], extra: Dict) -> None:
    print(f"{'path':<14}{'detector':<12}{'frames/s':>10}{'GB/s':>8}{'x legacy':>10}"
          f"{'of memcpy':>11}{'client ms':>11}{'server ms':>11}")
    for r in rows:
        print(f"{r['name']:<14}{r['detector']:<12}{r['frames_per_s']:>10.1f}"
              f"{r['gb_per_s']:>8.2f}{r['ratio_vs_legacy']:>10.2f}"
              f"{100 * r['fraction_of_memcpy']:>10.0f}%{r['client_cpu_ms_per_frame']:>11.2f}"
              f"{r['server_cpu_ms_per_frame']:>11.2f}")
    for key, value in extra.items():
        print(f"{key}: {value}")


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dets = sorted({r["detector"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(dets)
    for k, det in enumerate(dets):
        fps = [next(r["frames_per_s"] for r in rows if r["name"] == n and r["detector"] == det)
               for n in names]
        ax.bar(np.arange(len(names)) + k * width, fps, width, label=f"{det} calib")
    ax.set_xticks(np.arange(len(names)) + width * (len(dets) - 1) / 2, names, rotation=20)
    ax.set_ylabel("frames/s")
    ax.set_title("psana-ipc throughput per path (synthetic source, one run)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--detectors", nargs="+", default=["epix10k2M", "jungfrau4M"])
    ap.add_argument("--frames", type=int, default=200, help="frames per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--cost-ms", type=float, default=0.0,
                    help="time the synthetic source takes per event (emulates psana)")
    ap.add_argument("--cost-kind", choices=["burn", "wait"],
                    help="burn: CPU time (the default); wait: a sleep, as a network file "
                         "system's (the default of --across-nodes)")
    ap.add_argument("--shm-budget", default="2G",
                    help="room for three in-flight batch arenas of jungfrau4M on top of the slots")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH")
    ap.add_argument("--new-consumers", action="store_true",
                    help="measure what a new loader, client or epoch pays instead (first "
                         "detector only; with --cost-ms also the frame cache's second client "
                         "and a cold epoch as a user starts it)")
    ap.add_argument("--cache-frames", type=int, default=160,
                    help="events of the --new-consumers frame-cache rows")
    ap.add_argument("--user-wait", type=float, default=5.0,
                    help="seconds between a server's start and its first loader (--new-consumers)")
    ap.add_argument("--user-cache", default="4G",
                    help="the frame cache of the --new-consumers cold-epoch row")
    ap.add_argument("--frame-cache", action="store_true",
                    help="measure the frame cache instead (needs --cost-ms; first detector only)")
    ap.add_argument("--resume", action="store_true",
                    help="measure the time to the first batch, fresh and resumed mid-epoch, "
                         "instead (first detector only)")
    ap.add_argument("--across-nodes", action="store_true",
                    help="measure across network namespaces instead (root; first detector "
                         "only): BatchLoader inline against a plain TCP stream on loopback and "
                         "across a veth pair, TLS on that stream, two servers on two hosts "
                         "against one with --cost-ms (40 by default) of waiting per event, "
                         "byte-identical frames, and a server killed mid-epoch")
    args = ap.parse_args()
    for wanted, bench, show in ((args.new_consumers, bench_new_consumers, print_consumers_table),
                                (args.resume, bench_resume, print_resume_table),
                                (args.frame_cache, bench_frame_cache, print_cache_table),
                                (args.across_nodes, bench_across_nodes.run,
                                 bench_across_nodes.print_table)):
        if wanted:
            result = bench(args)
            show(result)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
            return 0
    with running_server(args, "--shm-budget", args.shm_budget) as server:
        rows = [r for det in args.detectors
                for r in bench_detector(server, det, args)]
        stats = _stats(server.address)
    extra = {"server_workers": args.server_workers, "cost_ms": args.cost_ms,
             "peak_shm_mb": round(stats["shm_peak_bytes"] / 1e6, 1),
             "shm_budget_mb": round(stats["shm_budget"] / 1e6, 1)}
    if args.cost_ms:
        extra["workers_over_cost_fps"] = round(args.server_workers * 1000 / args.cost_ms, 1)
    print_table(rows, extra)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, **extra}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
