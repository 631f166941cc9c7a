"""`ElasticSampler`: the order of IPCRemotePsanaDataset / RunDataset items in
a DataLoader, with a position that checkpoints and resumes mid-epoch on any
number of ranks (client/epoch_order.py, client/position.py).

It is torchdata's sampler protocol: inside a `StatefulDataLoader`, whose
snapshots take the sampler's state as it was when each batch was drawn, the
loader's `state_dict()` is the consumed position, resumed by the sampler
without iterating over what was done. A plain DataLoader draws indices
ahead of the training loop, so there the position is kept by
`ResumableDataLoader` (client/resumable_loader.py), which counts the batches
it hands over; neither depends on the number of DataLoader workers, except
that StatefulDataLoader itself needs the same number to resume.
"""
from typing import Any, Dict, Iterator, List, Optional, Sized

from torch.utils.data import Sampler

from .distributed import rank_and_world
from .position import EpochCursor


class ElasticSampler(Sampler):
    """This rank's indices of a dataset for one epoch, in an order that depends
    only on (seed, epoch, the dataset's events): rank r takes every world-th
    index of the epoch's order from r, as DistributedSampler does.

    Args:
        dataset: an IPCRemotePsanaDataset or RunDataset (its `requests_list`
            is fingerprinted, so a position of other events is refused), or
            any sized dataset (fingerprinted by its length).
        shuffle: a new order every epoch (`set_epoch`), torch.randperm seeded
            with seed + epoch, as DistributedSampler's.
        seed: the same on every rank.
        rank, world_size: default from torch.distributed, torchrun or srun.
        batch_size: the DataLoader's; the position counts batches with it and
            drop_last keeps whole steps (a full batch on every rank).
        drop_last: only whole steps.
        padding: "none" (every item once per epoch; at the epoch's end a rank
            may have one batch fewer than others) or "wrap" (DistributedSampler's
            padding: every rank as many, the first items again).
    """

    def __init__(self, dataset: Sized, shuffle: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 batch_size: int = 1, drop_last: bool = False, padding: str = "none") -> None:
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.dataset = dataset
        self.batch_size = batch_size
        requests = getattr(dataset, "requests_list", None)
        self._cursor = EpochCursor(len(dataset),
                                   (lambda: requests) if requests is not None
                                   else (lambda: range(len(dataset))),
                                   seed, shuffle, padding, drop_last, batch_size, rank, world_size)

    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        """As DistributedSampler's; the epoch a loaded position stands in goes
        on from that position."""
        self._cursor.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._cursor.share())

    def indices(self) -> List[int]:
        """This rank's indices for the next pass, without starting it."""
        return [int(p) for p in self._cursor.share()]

    def __iter__(self) -> Iterator[int]:
        share = self._cursor.begin()
        for position in share:
            self._cursor.consumed(1)
            yield int(position)
        self._cursor.finished()

    def state_dict(self) -> Dict[str, Any]:
        """The position of the indices drawn so far (see the module docstring
        for when that is the consumed position)."""
        return self._cursor.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The next iteration goes on from a saved position, on this sampler's
        rank and world size; StateError (`.code`) for other events or order."""
        self._cursor.load_state_dict(state)

    def state_after(self, items: int, complete: bool = False) -> Dict[str, Any]:
        """The position once this rank's first `items` indices of the current pass
        were consumed (`complete`: all of them), for a loader that counts what
        it hands over."""
        return self._cursor.position_at(items, complete).to_state()
