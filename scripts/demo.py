#!/usr/bin/env python
"""The main job on the embedded default: an iserver on the synthetic source
with a frame cache, one epoch read from the source, then the same epoch from
the cache through btx's dialect, IPCRemotePsanaDataset and BatchLoader, with
frames/s and ratios to btx's dialect; a legacy DONE stops the server. The
epochs start once the server's idle workers have taken the cache's pages, as
for a server started ahead of its job.

    python scripts/demo.py [--detector epix10k2M] [--events 200] [--cost-ms 10]

The synthetic source burns `--cost-ms` of CPU per event, as psana's calib
does (about 10 ms), so the first epoch is bound by the source and the next
ones by the transport. The same on a real run, with the server in the psana
environment:

    python scripts/demo.py --server-python .venv-psana/bin/python --exp tstx00117 --run 1 \\
        --server-args "--source psana2 --data-dir DIR --offline --calib-dir CDIR"
"""
import argparse
import shlex
import statistics
import sys
import time
from typing import Callable, Iterable, List

from torch.utils.data import DataLoader
from tqdm import tqdm

from psana_ipc.client import BatchLoader, Client, IPCRemotePsanaDataset
from psana_ipc.client.server_process import ServerProcess
from psana_ipc.client.stop import stop_server
from psana_ipc.protocol.address import parse_address


def timed(label: str, make: Callable[[], Iterable], frames: int, args: argparse.Namespace
          ) -> float:
    """Frames/s of one pass over a loader made afresh, as a new consumer meets it
    (its workers and buffers included), with a progress bar on stderr."""
    t0, seen = time.perf_counter(), 0
    with tqdm(total=frames, desc=f"  {label:22s}", unit=" frames", leave=False,
              file=sys.stderr, disable=args.quiet) as bar:
        for batch in make():
            seen += len(batch)
            bar.update(len(batch))
    assert seen == frames, f"{label}: {seen} of {frames} frames"
    return frames / (time.perf_counter() - t0)


def rate(label: str, make: Callable[[], Iterable], args: argparse.Namespace) -> float:
    """Median frames/s of `--repeats` passes."""
    return statistics.median(timed(label, make, args.events, args) for _ in range(args.repeats))


def warm_up(address: str, timeout: float = 60.0) -> None:
    """Wait (at most `timeout`) until the server's idle workers have taken the frame
    cache's pages, as they have for a server started ahead of its job."""
    with Client(address) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cache = client.stats()["frame_cache"]
            if cache is None or cache["pool_bytes"] >= cache["limit"]:
                return
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", default="xpptut15")
    ap.add_argument("--run", type=int, default=14)
    ap.add_argument("--detector", default="epix10k2M")
    ap.add_argument("--mode", default="calib", choices=["raw", "calib", "image", "mask"])
    ap.add_argument("--events", type=int, default=200, help="events in the epoch")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed passes over the cached epoch; the median is shown")
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument("--cost-ms", type=float, default=10.0,
                    help="CPU the synthetic source burns per event (psana's calib: about 10)")
    ap.add_argument("--frame-cache", default="2G",
                    help="the server's frame cache (the default holds the default epoch)")
    ap.add_argument("--server-python", default=sys.executable,
                    help="python of the environment the server runs in (default: this one)")
    ap.add_argument("--server-args", default="",
                    help="iserver options for another source (then --cost-ms does not apply)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    source = shlex.split(args.server_args) or ["--cost-ms", str(args.cost_ms)]
    print("starting iserver ...", flush=True)
    server = ServerProcess(["--workers", str(args.server_workers), "--log-level", "WARNING",
                            "--frame-cache", args.frame_cache, *source],
                           python=args.server_python)
    try:
        what = args.server_args or f"synthetic source, {args.cost_ms:g} ms per event"
        print(f"iserver ({what}, frame cache {args.frame_cache}) on {server.address}: "
              f"{args.events} {args.detector} {args.mode} frames, batches of "
              f"{args.batch_size}, {args.loader_workers} DataLoader workers", flush=True)
        requests = [(args.exp, args.run, "idx", args.detector, e) for e in range(args.events)]
        warm_up(server.address)

        def batch_loader() -> BatchLoader:
            return BatchLoader(server.address, args.exp, args.run, args.detector, args.mode,
                               range(args.events), args.batch_size)

        def data_loader(protocol: str) -> Callable[[], DataLoader]:
            return lambda: DataLoader(
                IPCRemotePsanaDataset(server.address, requests, mode=args.mode,
                                      protocol=protocol),
                batch_size=args.batch_size, num_workers=args.loader_workers)

        first = timed("first epoch (source)", batch_loader, args.events, args)
        print(f"  first epoch, read by the source: {first:8.1f} frames/s", flush=True)
        print("  the same epoch from the frame cache:")
        rows: List = [("btx dialect, DataLoader", data_loader("legacy")),
                      ("IPCRemotePsanaDataset", data_loader("v1")),
                      ("BatchLoader", batch_loader)]
        legacy = None
        for label, make in rows:
            fps = rate(label, make, args)
            legacy = legacy or fps
            print(f"    {label:24s} {fps:8.1f} frames/s  {fps / legacy:5.1f}x btx dialect",
                  flush=True)
        print(f"  a cached epoch through BatchLoader: {fps / first:.1f}x the first epoch")
        print(stop_server(parse_address(server.address), legacy=True))
        server.proc.wait(30)
    finally:
        code = server.stop()
    print(f"server stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
