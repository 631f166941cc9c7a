"""`ResumableDataLoader`: a torch DataLoader over an IPCRemotePsanaDataset or
RunDataset whose `state_dict()` is the position the training loop has
consumed, resumable mid-epoch on another number of ranks *and* of DataLoader
workers (torchdata's StatefulDataLoader needs the same number of workers).

A DataLoader draws its sampler's indices ahead of the loop (prefetch), so
the sampler alone cannot tell what was consumed; this loader counts the
batches it hands over and asks its ElasticSampler for the position after
that many. Resuming reads nothing again: the sampler starts at the saved
position of the epoch's order.
"""
from typing import Any, Dict, Iterator, Optional, Sized

from torch.utils.data import DataLoader

from .sampler import ElasticSampler


class ResumableDataLoader(DataLoader):
    """A DataLoader whose order is an ElasticSampler's and whose position
    checkpoints. Use it as DataLoader, with `set_epoch` every epoch:

        loader = ResumableDataLoader(RunDataset(None, exp, run, det), batch_size=32,
                                     shuffle=True, seed=0, num_workers=4)
        loader.load_state_dict(saved)                 # when resuming
        for epoch in range(loader.epoch, epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                ...
                save({"model": ..., "loader": loader.state_dict()})

    Args:
        dataset: the dataset (its events are fingerprinted in the state).
        batch_size: items per batch on this rank.
        shuffle, seed, rank, world_size, drop_last, padding: the order, as
            ElasticSampler's.
        **kwargs: the other DataLoader arguments (num_workers, pin_memory,
            persistent_workers, collate_fn, ...), not sampler or shuffle.
    """

    def __init__(self, dataset: Sized, batch_size: int = 1, shuffle: bool = False,
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_last: bool = False, padding: str = "none", **kwargs: Any) -> None:
        sampler = ElasticSampler(dataset, shuffle, seed, rank, world_size, batch_size,
                                 drop_last, padding)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._handed: Optional[int] = None    # items handed over in this pass, once begun
        self._complete = False

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """As DistributedSampler.set_epoch; the epoch a loaded position stands in
        goes on from that position."""
        self.sampler.set_epoch(epoch)
        self._handed = None

    def __iter__(self) -> Iterator[Any]:
        share = len(self.sampler)
        self._handed, self._complete = 0, False
        for batch in super().__iter__():
            self._handed = min(share, self._handed + self.batch_size)
            yield batch
        self._complete = True

    def state_dict(self) -> Dict[str, Any]:
        """The consumed position (JSON-serializable), never how far workers
        fetched ahead."""
        if self._handed is None:
            return self.sampler.state_dict()
        return self.sampler.state_after(self._handed, self._complete)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The next iteration goes on from a position saved by any rank of any
        world, with any number of workers; StateError (`.code`) for other
        events or another order."""
        self.sampler.load_state_dict(state)
        self._handed = None
