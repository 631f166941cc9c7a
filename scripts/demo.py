#!/usr/bin/env python
"""The main job on the embedded default: start an iserver on the synthetic
source, load events through a torch DataLoader with IPCRemotePsanaDataset
(v1, then the legacy btx dialect for comparison), print frames/s, and stop
the server.

    python scripts/demo.py [--detector epix10k2M] [--events 400] [--loader-workers 2]

The same on a real run, with the server in the psana environment:

    python scripts/demo.py --server-python .venv-psana/bin/python --exp tstx00117 --run 1 \\
        --server-args "--source psana2 --data-dir DIR --offline --calib-dir CDIR"
"""
import argparse
import shlex
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from psana_ipc.client import Client, IPCRemotePsanaDataset
from psana_ipc.client.server_process import ServerProcess


def load(address: str, protocol: str, args: argparse.Namespace) -> float:
    """Median frames/s of `--repeats` passes over the events, after a pass over the
    first few that lets every server worker open the run (psana's set-up is paid
    once per worker)."""
    requests = [(args.exp, args.run, "idx", args.detector, e) for e in range(args.events)]
    warm = requests[: 2 * args.batch_size * max(1, args.loader_workers)]
    rates = []
    for k, part in enumerate([warm] + [requests] * args.repeats):
        dataset = IPCRemotePsanaDataset(address, part, mode=args.mode, protocol=protocol)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.loader_workers)
        frames, t0 = 0, time.perf_counter()
        label = f"{protocol} warm-up" if k == 0 else f"{protocol} pass {k}"
        with tqdm(total=len(part), desc=f"  {label:15s}", unit=" frames", leave=False,
                  file=sys.stderr, disable=args.quiet) as bar:
            for batch in loader:
                assert isinstance(batch, torch.Tensor)
                frames += batch.shape[0]
                bar.update(batch.shape[0])
        rates.append(frames / (time.perf_counter() - t0))
    fps = statistics.median(rates[1:])
    gbps = fps * batch[0].numel() * batch.element_size() / 1e9
    print(f"  {protocol:7s} {frames} frames {tuple(batch.shape[1:])} {batch.dtype}: "
          f"{fps:8.1f} frames/s, {gbps:.2f} GB/s", flush=True)
    return fps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", default="xpptut15")
    ap.add_argument("--run", type=int, default=14)
    ap.add_argument("--detector", default="epix10k2M")
    ap.add_argument("--mode", default="calib", choices=["raw", "calib", "image", "mask"])
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes; the median is shown")
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument("--server-python", default=sys.executable,
                    help="python of the environment the server runs in (default: this one)")
    ap.add_argument("--server-args", default="", help="more iserver options, e.g. a source")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    print("starting iserver ...", flush=True)
    server = ServerProcess(["--workers", str(args.server_workers), "--log-level", "WARNING",
                            *shlex.split(args.server_args)], python=args.server_python)
    try:
        print(f"iserver {args.server_args or '(synthetic)'} on {server.address}; DataLoader "
              f"with {args.loader_workers} workers, batch {args.batch_size}, "
              f"{args.detector} {args.mode}", flush=True)
        v1 = load(server.address, "v1", args)
        legacy = load(server.address, "legacy", args)
        print(f"  v1 / legacy: {v1 / legacy:.1f}x")
        Client(server.address).shutdown()
        server.proc.wait(30)
    finally:
        code = server.stop()
    print(f"server stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
