"""The order of an epoch's events, and which of them each rank takes.

Elastic determinism: an epoch's global order depends only on (seed, epoch,
the event list). Ranks take every world-th position of what is left of it
(rank r takes positions r, r + world, ...), so after every rank has taken n
events the world has consumed exactly the first n * world positions. A
resume on another number of ranks continues from that prefix: nothing of
the epoch is repeated or skipped, and the global order stays the same.

Run from the start with padding "wrap" this is exactly torch's
DistributedSampler: the shuffle is `torch.randperm` seeded with
`seed + epoch`, the order is padded by wrapping around to a multiple of the
world size, and rank r takes every world-th event from r.
"""
import importlib.util
import math
from typing import Sequence

import numpy as np

PADDINGS = ("none", "wrap")


def generator_name() -> str:
    """Which shuffle this process makes: torch's when torch is installed
    (DistributedSampler's), else numpy's. A saved position records it.
    Looked up, not imported: a loader that never shuffles never pays
    torch's import (seconds)."""
    return "numpy" if importlib.util.find_spec("torch") is None else "torch"


def permutation(n: int, seed: int) -> np.ndarray:
    """DistributedSampler's shuffle of range(n) for `seed` (numpy's without torch)."""
    if generator_name() == "numpy":
        return np.random.default_rng(seed).permutation(n)
    import torch
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).numpy()


def global_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Positions 0..n-1 of the event list in the order the epoch visits them."""
    return permutation(n, seed + epoch) if shuffle else np.arange(n)


def rank_positions(order: np.ndarray, start: int, rank: int, world: int, batch_size: int = 1,
                   padding: str = "none", drop_last: bool = False) -> np.ndarray:
    """This rank's share of `order[start:]`: every world-th position from `rank`.

    padding "wrap" repeats the first of them until every rank has as many
    (DistributedSampler's padding); drop_last keeps only whole steps, where
    a step is one batch of `batch_size` on every rank."""
    rest = order[start:]
    if padding == "wrap" and len(rest):
        rest = np.resize(rest, math.ceil(len(rest) / world) * world)
    if drop_last:
        rest = rest[: len(rest) // (world * batch_size) * world * batch_size]
    return rest[rank::world]


def epoch_order(events: Sequence[int], epoch: int, seed: int, shuffle: bool, rank: int,
                world: int, padding: str = "none", start: int = 0) -> list:
    """This rank's events for one epoch, from position `start` of its order."""
    order = global_order(len(events), epoch, seed, shuffle)
    picked = rank_positions(order, start, rank, world, padding=padding)
    return [int(e) for e in np.asarray(events, dtype=np.int64)[picked]]
