"""A training loop fed by IPCRemotePsanaDataset: a small autoencoder on binned
detector frames, each rank training on its own share of the events.

In a psana-ipc SLURM job (one iserver per node, this script on every task):
    psana-ipc slurm -n 2 --server-args='--source psana2 --workers 4' -- \\
        python scripts/slurm/train.py --exp mfxl1027522 --run 9 --detector epix10k2M --events 400
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from feed import add_data_arguments, rank_loader, write_summary


def binned(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """(batch, ..., H, W) frames -> (batch, features): panels as channels, average-pooled by
    `factor`, then standardized per frame so every detector trains at the same scale."""
    x = frames.float().reshape(frames.shape[0], -1, *frames.shape[-2:])
    x = F.avg_pool2d(x, factor).flatten(1)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


def autoencoder(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bin", type=int, default=8, help="pooling factor (default: 8)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    loader, summary = rank_loader(args)
    model = optimizer = None
    frames = 0
    for epoch in range(args.epochs):
        total = 0.0
        for batch in loader:
            x = binned(batch, args.bin)
            if model is None:  # sized by the first batch: the detector decides the input
                model = autoencoder(x.shape[1], args.hidden)
                optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            loss = F.mse_loss(model(x), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
            frames += len(x)
        print(f"rank {summary['rank']} epoch {epoch}: loss {total / len(loader.dataset):.4f}",
              flush=True)
    write_summary(args, dict(summary, frames=frames, final_loss=total / len(loader.dataset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
