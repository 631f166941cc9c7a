#!/usr/bin/env python
"""The main job on the embedded default: start an iserver on the synthetic
source, load events through a torch DataLoader with IPCRemotePsanaDataset
(v1, then the legacy btx dialect for comparison), print frames/s, and stop
the server.

    python scripts/demo.py [--detector epix10k2M] [--events 400] [--loader-workers 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from psana_ipc.client import Client, IPCRemotePsanaDataset


def start_server(workers: int, tmp: str, *options: str) -> subprocess.Popen:
    """An iserver on a free port (synthetic source unless `options` say otherwise),
    returned once it accepts; its address is in `.address`."""
    ready = os.path.join(tmp, "ready.json")
    proc = subprocess.Popen([sys.executable, "-m", "psana_ipc.server", "--port", "0",
                             "--workers", str(workers), "--ready-file", ready,
                             "--log-level", "WARNING", *options])
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("demo: the server did not start")
        time.sleep(0.05)
    with open(ready) as f:
        proc.address = json.load(f)["address"]
    return proc


def load(address: str, protocol: str, args: argparse.Namespace) -> float:
    requests = [("xpptut15", 14, "idx", args.detector, e) for e in range(args.events)]
    dataset = IPCRemotePsanaDataset(address, requests, mode="calib", protocol=protocol)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.loader_workers)
    frames, t0 = 0, time.perf_counter()
    for batch in loader:
        assert isinstance(batch, torch.Tensor)
        frames += batch.shape[0]
    elapsed = time.perf_counter() - t0
    fps = frames / elapsed
    print(f"  {protocol:7s} {frames} frames {tuple(batch.shape[1:])} {batch.dtype} in "
          f"{elapsed:.2f}s: {fps:8.1f} frames/s, {fps * batch[0].numel() * 4 / 1e9:.2f} GB/s")
    return fps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detector", default="epix10k2M")
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--server-workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.server_workers, tmp)
        try:
            print(f"iserver (synthetic) on {server.address}; DataLoader with "
                  f"{args.loader_workers} workers, batch {args.batch_size}, {args.detector} calib")
            v1 = load(server.address, "v1", args)
            legacy = load(server.address, "legacy", args)
            print(f"  v1 / legacy: {v1 / legacy:.1f}x")
            Client(server.address).shutdown()
            code = server.wait(30)
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(30)
    print(f"server stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
