"""Where this process stands in a multi-process job.

A job launched by `psana-ipc slurm` runs one client per SLURM task and one
server per node; each client reads its own share of the events from its own
node's server. These helpers answer "which share" the same way whether the
job runs under torch.distributed, torchrun, srun or alone. (Which server:
the launcher sets $PSANA_IPC_ADDRESS, which `Client()` reads when given no
address.)
"""
import os
import sys
from typing import Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size): an initialized torch.distributed group first, then
    torchrun's RANK/WORLD_SIZE, then srun's SLURM_PROCID/SLURM_NTASKS, else (0, 1).

    torch is consulted only if the program already imported torch.distributed,
    so a client without torch never pays for importing it.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var])
    return 0, 1


def shard(items: Sequence[T], rank: Optional[int] = None,
          world: Optional[int] = None) -> Sequence[T]:
    """Every world-th item starting at rank: disjoint shares that cover `items`.
    Rank and world default to `rank_and_world()`."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return items[rank::world]

