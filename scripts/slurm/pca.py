"""The btx PCA task fed by IPCRemotePsanaDataset: an incremental PCA of binned
detector frames over batches, never holding more than one batch, each rank on
its own share of the events.

In a psana-ipc SLURM job (one iserver per node, this script on every task):
    psana-ipc slurm -n 4 --server-args='--source psana2 --workers 4' -- \\
        python scripts/slurm/pca.py --exp mfxl1027522 --run 9 --detector epix10k2M \\
        --events 1000 --components 10 --save pca-{rank}.npz
"""
import argparse
import sys
from typing import Optional

import numpy as np
import torch.nn.functional as F

from feed import add_data_arguments, rank_loader, write_summary


class IncrementalPCA:
    """Principal components updated one batch at a time (Ross et al. 2008, the
    method of scikit-learn's IncrementalPCA): the SVD of the old components
    scaled by their singular values, the centred batch, and a row that moves
    the old mean to the new one."""

    def __init__(self, components: int) -> None:
        self.k = components
        self.n = 0
        self.mean: Optional[np.ndarray] = None
        self.components: Optional[np.ndarray] = None
        self.singular_values: Optional[np.ndarray] = None

    def partial_fit(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        b = len(x)
        batch_mean = x.mean(0)
        if self.n == 0:
            stacked = x - batch_mean
            mean = batch_mean
        else:
            mean = (self.n * self.mean + b * batch_mean) / (self.n + b)
            shift = np.sqrt(self.n * b / (self.n + b)) * (self.mean - batch_mean)
            stacked = np.vstack([self.singular_values[:, None] * self.components,
                                 x - batch_mean, shift])
        _, s, vt = np.linalg.svd(stacked, full_matrices=False)
        self.n += b
        self.mean = mean
        self.components = vt[:self.k]
        self.singular_values = s[:self.k]

    def explained_variance(self) -> np.ndarray:
        return self.singular_values ** 2 / max(self.n - 1, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--bin", type=int, default=8, help="pooling factor (default: 8)")
    parser.add_argument("--save", metavar="PATH", help="save mean, components and singular "
                                                      "values with numpy; {rank} is replaced")
    args = parser.parse_args()
    loader, summary = rank_loader(args)
    pca = IncrementalPCA(args.components)
    for batch in loader:
        x = batch.float().reshape(batch.shape[0], -1, *batch.shape[-2:])
        pca.partial_fit(F.avg_pool2d(x, args.bin).flatten(1).numpy())
    if args.save:
        np.savez(args.save.format(rank=summary["rank"]), mean=pca.mean,
                 components=pca.components, singular_values=pca.singular_values)
    write_summary(args, dict(summary, frames=pca.n,
                             explained_variance=pca.explained_variance().tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
