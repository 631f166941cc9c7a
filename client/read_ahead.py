"""Read-ahead for a map-style dataset under a DataLoader, which does not tell
the dataset its sampler's order: when a batch's indices are consecutive (a
SequentialSampler, whole or split over DataLoader workers), the events of
the next `batches` batches are hinted to the server, whose idle workers read
them into its frame cache (`iserver --frame-cache`; without one the hint is
ignored). A shuffled order gives no hint. Hints from several DataLoader
workers overlap; the server reads each frame once.
"""
from itertools import groupby
from typing import Any, Sequence, Tuple

from .group import ConnectionGroup

Request = Tuple[Any, ...]   # (exp, run, access_mode, detector_name, event)


class SequentialReadAhead:
    def __init__(self, requests_list: Sequence[Request], group: ConnectionGroup, mode: str,
                 batches: int = 8) -> None:
        self.requests_list = requests_list
        self.group = group
        self.mode = mode
        self.batches = batches
        self._hinted = 0          # requests before this index were hinted already
        self._last = -1

    def follow(self, indices: Sequence[int]) -> None:
        """Note a batch's indices; hint what follows them if they are in order."""
        if not len(indices) or not self.batches:
            return
        if indices[0] <= self._last:             # a new epoch
            self._hinted = 0
        self._last = indices[-1]
        if any(b - a != 1 for a, b in zip(indices, indices[1:])):
            return
        start = max(self._hinted, indices[-1] + 1)
        end = min(len(self.requests_list), indices[-1] + 1 + self.batches * len(indices))
        if end <= start:
            return
        ahead = self.requests_list[start:end]
        for (exp, run, access, det), same in groupby(ahead, key=lambda r: tuple(r[:4])):
            self.group.prefetch(exp, run, det, [[r[4] for r in same]], self.mode, access)
        self._hinted = end
