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
  zero-copy     BatchLoader.views(): the frames in the server's pool, no client copy
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

`--against CHECKOUT` compares instead this checkout with another, path by
path, their passes taken in turn (scripts/bench_against.py): whether a change
made any path slower, which separate runs on a shared machine cannot tell.

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
import sys
from typing import Callable, Dict, List

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from psana_ipc.client.server_process import ServerProcess
from psana_ipc.server.sources.synthetic import expected

import bench_across_nodes  # this directory's modules
import bench_against
import bench_frame_cache
import bench_new_consumers
import bench_resume
from bench_common import memcpy_pass, running_server, server_paths, server_stats, timed


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


def bench_detector(server: ServerProcess, det: str,
                   args: argparse.Namespace) -> List[Dict]:
    events = list(range(args.frames))
    frame_bytes = expected(det, "calib", 0).nbytes
    made = server_paths(server.address, det, events, args.loader_workers, args.batch_size)
    paths = {**{name: make() for name, make in made.items()},
             "collate-w0": collate_pass(det, args.frames, 0, args.batch_size),
             f"collate-w{args.loader_workers}": collate_pass(det, args.frames,
                                                             args.loader_workers, args.batch_size),
             "memcpy": memcpy_pass(det, args.frames, args.batch_size)}
    measured = {}
    progress = tqdm(paths.items(), desc=det, unit="path", file=sys.stderr)
    for name, run in progress:
        progress.set_postfix_str(name)
        measured[name] = timed(run, args.repeats, server)
        progress.write(f"  {det} {name}: {measured[name]['fps']:.0f} frames/s", file=sys.stderr)
        getattr(run, "close", lambda: None)()
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
                    help="time the synthetic source takes per event (emulates psana)")
    ap.add_argument("--cost-kind", choices=["burn", "wait"],
                    help="burn: CPU time (the default); wait: a sleep, as a network file "
                         "system's (the default of --across-nodes)")
    ap.add_argument("--shm-budget", default="4G",
                    help="a lone client may hold half of it: room for the arena row's four "
                         "batch buffers of jungfrau4M beside the frames in flight")
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
    ap.add_argument("--against", metavar="CHECKOUT",
                    help="compare this checkout with another (an earlier release's) instead, "
                         "path by path: each side with a server of its own, their passes taken "
                         "in turn (needs CHECKOUT/.venv, as scripts/test.sh builds it, or "
                         "--against-python)")
    ap.add_argument("--against-python", metavar="PYTHON",
                    help="the python of the --against checkout's environment")
    ap.add_argument("--pairs", type=int, default=16,
                    help="passes of each side per path with --against (default: %(default)s)")
    ap.add_argument("--paths", nargs="+", metavar="PATH",
                    help="the paths --against compares (default: every path through a server)")
    args = ap.parse_args()
    for wanted, mode in ((args.against, bench_against),
                         (args.new_consumers, bench_new_consumers), (args.resume, bench_resume),
                         (args.frame_cache, bench_frame_cache),
                         (args.across_nodes, bench_across_nodes)):
        if wanted:
            result = mode.run(args)
            mode.print_table(result)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
            return 0
    with running_server(args, "--shm-budget", args.shm_budget) as server:
        rows = [r for det in args.detectors
                for r in bench_detector(server, det, args)]
        stats = server_stats(server.address)
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
