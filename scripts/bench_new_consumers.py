"""`scripts/bench.py --new-consumers`: what a new loader, client or epoch pays."""
import argparse
import statistics
import time
from typing import Callable, Dict, List

import numpy as np

from psana_ipc.client import BatchLoader
from psana_ipc.server.sources.synthetic import expected

from bench_common import (WARM_BATCHES, dataset_pass, epoch_fps,  # this directory's module
                          loader_pass, print_head, running_server, timed)


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
        fps = epoch_fps(loader)
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
            firsts.append(epoch_fps(loaders[0]))
            seconds.append(epoch_fps(loaders[1]))
            same = same and _frames_are_the_sources(loaders[1], args.detectors[0])
            for loader in loaders:
                loader.close()
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {"first epoch": first, "second client": second, "x first": second / first,
            "bytes identical": same}


def run(args: argparse.Namespace) -> Dict:
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


def print_table(result: Dict) -> None:
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

