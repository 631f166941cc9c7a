"""What the resume tests share: telling a synthetic frame's event from its
bytes, and running several ranks' loaders a step at a time, as DDP does."""
from typing import Iterable, Iterator, List, Optional

import numpy as np

from psana_ipc.server.sources.synthetic import STEP


def event_of(frame) -> int:
    """The synthetic event a raw frame is (its first pixel is 101 * event, below 16384)."""
    return int(np.asarray(frame).flat[0]) // STEP


def lockstep(loaders: Iterable, steps: Optional[int] = None) -> List[int]:
    """Every rank's next batch, a step at a time, until `steps` steps or the end
    of the epoch; the events in global order (rank r's j-th event of a step is
    at place j * world + r of that step)."""
    iterators: List[Iterator] = [iter(loader) for loader in loaders]
    seen: List[int] = []
    step = 0
    while step != steps:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            break
        rows = [[event_of(f) for f in b] if b is not None else [] for b in batches]
        for j in range(max(len(r) for r in rows)):
            seen += [r[j] for r in rows if j < len(r)]
        step += 1
    return seen
