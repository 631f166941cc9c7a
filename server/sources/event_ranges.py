"""Sets of event indices as [start, stop, step] ranges, Python's `range`
meaning: how `info` tells which events hold a detector (a detector at every
3rd event is one range, whatever the run's length)."""
from typing import Iterable, List, Sequence


def as_ranges(indices: Sequence[int]) -> List[List[int]]:
    """Sorted indices as [start, stop, step] ranges."""
    ranges: List[List[int]] = []
    i = 0
    while i < len(indices):
        step = indices[i + 1] - indices[i] if i + 1 < len(indices) else 1
        j = i
        while j + 1 < len(indices) and indices[j + 1] - indices[j] == step:
            j += 1
        ranges.append([indices[i], indices[j] + step, step])
        i = j + 1
    return ranges


def expand(ranges: Iterable[Sequence[int]]) -> List[int]:
    """The indices the ranges hold, in order."""
    return [e for r in ranges for e in range(*r)]
