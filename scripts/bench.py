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
  collate-wN    DataLoader alone over frames already in memory (no server): the
                ceiling DataLoader itself puts on any dataset
  memcpy        one thread copying the same frames: the physical reference

Each figure is the median of `--repeats` timed passes after one warm-up pass;
every pass of a path iterates the same DataLoader, as epochs of training do.
Prints a table (frames/s, GB/s, ratio to legacy, fraction of the memcpy
bandwidth, and CPU milliseconds per frame spent in this process and in the
server's workers over the timed passes) and the server's peak shared memory;
`--json` and `--plot` save the same. Example:

    python scripts/bench.py --json bench.json --plot bench.png
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import start_server  # noqa: E402

from psana_ipc.client import BatchLoader, Client, IPCRemotePsanaDataset  # noqa: E402
from psana_ipc.server.sources.synthetic import expected  # noqa: E402


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
    me = os.getpid()
    pids = set()
    for task in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
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


def timed(run: Callable[[], int], repeats: int, server: subprocess.Popen) -> Dict[str, float]:
    """Median frames/s of `repeats` passes after one warm-up pass, with the CPU
    per frame of this process (DataLoader workers included) and of the
    server's workers."""
    run()
    rates, frames = [], 0
    children0 = live_children(server.pid)
    mine0, server0 = client_cpu(server.pid, children0), cpu_seconds(server.workers)
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
        frames += n
    return {"fps": statistics.median(rates),
            "client_ms": 1e3 * (client_cpu(server.pid, children0) - mine0) / frames,
            "server_ms": 1e3 * (cpu_seconds(server.workers) - server0) / frames}


def dataset_pass(address: str, det: str, events: List[int], protocol: str, workers: int,
                 batch: int, persistent: bool = False) -> Callable[[], int]:
    requests = [("bench", 1, "idx", det, e) for e in events]
    ds = IPCRemotePsanaDataset(address, requests, mode="calib", protocol=protocol)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers,
                        persistent_workers=persistent)

    def run() -> int:
        return sum(b.shape[0] for b in loader)
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


def memcpy_pass(det: str, n: int, batch: int) -> Callable[[], int]:
    sources = np.stack([expected(det, "calib", e) for e in range(16)])
    out = np.empty((batch,) + sources.shape[1:], sources.dtype)

    def run() -> int:
        for k in range(n):
            np.copyto(out[k % batch], sources[k % len(sources)])
        return n
    return run


def bench_detector(server: subprocess.Popen, det: str,
                   args: argparse.Namespace) -> List[Dict]:
    address = server.address
    events = list(range(args.frames))
    frame_bytes = expected(det, "calib", 0).nbytes
    loader = BatchLoader(address, "bench", 1, det, "calib", events, args.batch_size)
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
        "collate-w0": collate_pass(det, args.frames, 0, args.batch_size),
        f"collate-w{args.loader_workers}": collate_pass(det, args.frames, args.loader_workers,
                                                        args.batch_size),
        "memcpy": memcpy_pass(det, args.frames, args.batch_size),
    }
    measured = {}
    for name, run in paths.items():
        measured[name] = timed(run, args.repeats, server)
        print(f"  {det} {name}: {measured[name]['fps']:.0f} frames/s", file=sys.stderr)
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
                    help="CPU time the synthetic source burns per event (emulates psana)")
    ap.add_argument("--shm-budget", default="1G")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.server_workers, tmp, "--cost-ms", str(args.cost_ms),
                              "--shm-budget", args.shm_budget,
                              "--synthetic-events", str(args.frames))
        try:
            rows = [r for det in args.detectors
                    for r in bench_detector(server, det, args)]
            with Client(server.address) as c:
                stats = c.stats()
                c.shutdown()
            server.wait(30)
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(30)
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
