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
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from psana_ipc.client import Client, IPCRemotePsanaDataset


def start_server(workers: int, tmp: str, *options: str,
                 python: str = sys.executable) -> subprocess.Popen:
    """An iserver on a free port (synthetic source unless `options` say otherwise),
    returned once it accepts; its address is in `.address`."""
    ready = os.path.join(tmp, "ready.json")
    proc = subprocess.Popen([python, "-m", "psana_ipc.server", "--port", "0",
                             "--workers", str(workers), "--ready-file", ready,
                             "--log-level", "WARNING", *options])
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("demo: the server did not start")
        time.sleep(0.05)
    with open(ready) as f:
        info = json.load(f)
    proc.address, proc.workers = info["address"], info["workers"]
    return proc


def load(address: str, protocol: str, args: argparse.Namespace) -> float:
    """Median frames/s of `--repeats` passes over the events, after a pass over the
    first few that lets every server worker open the run (psana's set-up is paid
    once per worker)."""
    requests = [(args.exp, args.run, "idx", args.detector, e) for e in range(args.events)]
    warm = requests[: 2 * args.batch_size * max(1, args.loader_workers)]
    rates = []
    for part in [warm] + [requests] * args.repeats:
        dataset = IPCRemotePsanaDataset(address, part, mode=args.mode, protocol=protocol)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.loader_workers)
        frames, t0 = 0, time.perf_counter()
        for batch in loader:
            assert isinstance(batch, torch.Tensor)
            frames += batch.shape[0]
        rates.append(frames / (time.perf_counter() - t0))
    fps = statistics.median(rates[1:])
    gbps = fps * batch[0].numel() * batch.element_size() / 1e9
    print(f"  {protocol:7s} {frames} frames {tuple(batch.shape[1:])} {batch.dtype}: "
          f"{fps:8.1f} frames/s, {gbps:.2f} GB/s")
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.server_workers, tmp, *shlex.split(args.server_args),
                              python=args.server_python)
        try:
            print(f"iserver {args.server_args or '(synthetic)'} on {server.address}; DataLoader "
                  f"with {args.loader_workers} workers, batch {args.batch_size}, "
                  f"{args.detector} {args.mode}")
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
