"""A training loop fed by IPCRemotePsanaDataset: a small autoencoder on binned
detector frames, each rank training on its own share of the events.

In a psana-ipc SLURM job (one iserver per node, this script on every task):
    psana-ipc slurm -n 2 --server-args='--source psana2 --workers 4' -- \\
        python scripts/slurm/train.py --exp mfxl1027522 --run 9 --detector epix10k2M --events 400

Surviving the time limit and preemption: with --checkpoint, rank 0 saves the
model, the optimizer and the loader's position there after every epoch and
when the job's warning signal arrives (then every rank exits 75 after the
same step), and a run that finds the file goes on from there, mid-epoch, on
any number of ranks:
    psana-ipc slurm -n 2 -t 04:00:00 --requeue --warn-before 300 --server-args=... -- \\
        python scripts/slurm/train.py ... --checkpoint ~/train.pt
The job requeues itself on that exit status; `psana-ipc position ~/train.pt`
tells where the saved position stands.
"""
import argparse
import os
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from feed import add_data_arguments, rank_loader, write_summary
from psana_ipc.client import preemption


def binned(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """(batch, ..., H, W) frames -> (batch, features): panels as channels, average-pooled by
    `factor`, then standardized per frame so every detector trains at the same scale."""
    x = frames.float().reshape(frames.shape[0], -1, *frames.shape[-2:])
    x = F.avg_pool2d(x, factor).flatten(1)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


def autoencoder(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features))


def save(path: Optional[str], rank: int, **parts: Any) -> None:
    """Rank 0 writes the checkpoint whole or not at all (a kill mid-write leaves the last)."""
    if path and rank == 0:
        torch.save({name: part.state_dict() for name, part in parts.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bin", type=int, default=8, help="pooling factor (default: 8)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="save here, and resume from here when it exists (see above)")
    args = parser.parse_args()
    torch.manual_seed(0)
    stop = preemption.watch()
    loader, summary = rank_loader(args)
    saved = None
    if args.checkpoint and os.path.exists(args.checkpoint):
        saved = torch.load(args.checkpoint, weights_only=True)
        loader.load_state_dict(saved["loader"])
    model = optimizer = None
    frames = 0
    total = 0.0
    for epoch in range(loader.epoch, args.epochs):
        loader.set_epoch(epoch)
        total, seen = 0.0, 0
        for batch in loader:
            x = binned(batch, args.bin)
            if model is None:  # sized by the first batch: the detector decides the input
                model = autoencoder(x.shape[1], args.hidden)
                optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
                if saved is not None:
                    model.load_state_dict(saved["model"])
                    optimizer.load_state_dict(saved["optimizer"])
            loss = F.mse_loss(model(x), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
            seen += len(x)
            frames += len(x)
            if stop.agreed():      # the job's time is nearly up: save, and ask to be requeued
                save(args.checkpoint, summary["rank"], model=model, optimizer=optimizer,
                     loader=loader)
                return preemption.RESUME_EXIT
        total /= max(seen, 1)
        print(f"rank {summary['rank']} epoch {epoch}: loss {total:.4f}", flush=True)
        if model is not None:
            save(args.checkpoint, summary["rank"], model=model, optimizer=optimizer,
                 loader=loader)
    write_summary(args, dict(summary, frames=frames, final_loss=total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
