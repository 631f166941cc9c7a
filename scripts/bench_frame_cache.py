"""`scripts/bench.py --frame-cache`: epochs with and without a frame cache,
psana's cost emulated by burning CPU."""
import argparse
import contextlib
import statistics
import threading
import time
from typing import Dict, Iterator, List

from torch.utils.data import DataLoader

from psana_ipc.client import BatchLoader, IPCRemotePsanaDataset
from psana_ipc.client.server_process import ServerProcess
from psana_ipc.server.sources.synthetic import expected

from bench_common import (WARM_BATCHES, cpu_seconds, epoch_fps,  # this directory's module
                          memcpy_pass, print_head, running_server, server_stats, timed)


@contextlib.contextmanager
def cache_server(args: argparse.Namespace, cache_bytes: int,
                 warm: bool = True) -> Iterator[ServerProcess]:
    """A server with a frame cache; `warm`: once its idle workers have taken
    the cache's memory and mapped it in, as a server started ahead of its job has."""
    with running_server(args, "--frame-cache", str(cache_bytes)) as server:
        while warm and server_stats(server.address)["frame_cache"]["ready_workers"] \
                < args.server_workers:
            time.sleep(0.05)
        yield server


def _epoch_cpu(loader: BatchLoader, server: ServerProcess,
               step_s: float = 0.0) -> Dict[str, float]:
    """Frames/s of one pass, and the CPU milliseconds per frame the server's
    workers spent on it (a steadier figure than frames/s on a shared node)."""
    before = cpu_seconds(server.workers)
    fps = epoch_fps(loader, step_s)
    spent = cpu_seconds(server.workers) - before
    return {"fps": fps, "server_ms": 1e3 * spent / len(loader.events)}


def _cache_stats(address: str) -> Dict:
    stats = server_stats(address)
    return dict(stats["frame_cache"], reads=stats["events"])


def _warmed(loader: BatchLoader, args: argparse.Namespace) -> BatchLoader:
    """The loader, after one pass over the WARM_BATCHES batches of events past
    the measured ones: each server worker has the run open and the loader's
    batch arenas (or buffers) have their pages, as after a job's first
    batches. What a job pays once stays out of the epochs compared; the
    measured events are still unread."""
    measured = loader.events
    loader.events = list(range(args.frames, args.frames + WARM_BATCHES * args.batch_size))
    epoch_fps(loader)
    loader.events = measured
    return loader


def run(args: argparse.Namespace) -> Dict:
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
        epoch_fps(epochs)
        before = _cache_stats(address)
        warm = [epoch_fps(epochs) for _ in range(args.repeats)]
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
                    fps = epoch_fps(DataLoader(ds, batch_size=batch), step)
                    ds.close()
                passes.append(fps)
        return {"fps": statistics.median(passes)}

    rows["dataset + step, no cache"] = dataset_step(cached=False)
    rows["dataset + step + read-ahead, epoch 1"] = dataset_step(cached=True)
    with cache_server(args, room) as server:
        address = server.address
        pair, rates = [loader(address, 8, warm=False) for _ in range(2)], []
        threads = [threading.Thread(target=lambda lo=lo: rates.append(epoch_fps(lo)))
                   for lo in pair]
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
            epoch_fps(scan)
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


def print_table(result: Dict) -> None:
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

