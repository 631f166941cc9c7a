"""How a batch assembled in a ring buffer goes through DataLoader unchanged.

The dataset's `__getitems__` has a batch written into a `RingBatch` (in
place by the server, or by copying each frame once) and returns its rows as
items of type `BatchRow`. A collate for that type,
registered in torch's `default_collate_fn_map` (torch's extension point),
makes the default collate return the batch itself instead of stacking the
items into fresh memory: a tensor over the buffer in the process that
iterates, or, in a DataLoader worker, a `SharedBatch` that reaches the main
process as a handle (batch_handoff). Items taken apart, reordered or mixed
with others are stacked as torch would.
"""
from typing import Any, List, Optional, Sequence

import numpy as np
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import default_collate, default_collate_fn_map

from psana_ipc.protocol.messages import frame_nbytes

from .batch_handoff import SharedBatch
from .batch_ring import BatchRing


class BatchRow(np.ndarray):
    """Item k of a ring batch: row k of it, no copy. Pickled as a plain array."""

    batch: Optional["RingBatch"] = None
    position = -1

    def __reduce__(self) -> Any:
        return np.array(self).__reduce__()


class RingBatch:
    """A batch of `shape` (frames first) in a buffer of the ring."""

    def __init__(self, ring: BatchRing, shape: Sequence[int], dtype: np.dtype) -> None:
        self._handed_over = get_worker_info() is not None
        pinned = not self._handed_over and _cuda()
        dtype = np.dtype(dtype)
        self.buffer = ring.lease(frame_nbytes(shape, dtype.itemsize), self._handed_over, pinned)
        self.array = self.buffer.lease(shape, dtype)

    def fits(self, frame: np.ndarray) -> bool:
        return frame.shape == self.array.shape[1:] and frame.dtype == self.array.dtype

    def rows(self) -> List[BatchRow]:
        rows = []
        for k, row in enumerate(self.array.view(BatchRow)):
            row.batch, row.position = self, k
            rows.append(row)
        return rows

    def output(self) -> Any:
        """The whole batch as this process hands it on."""
        if self._handed_over:
            return SharedBatch(self.buffer, self.array)
        import torch
        return torch.from_numpy(self.array)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def collate_rows(rows: Sequence[BatchRow], *, collate_fn_map: Optional[dict] = None) -> Any:
    """The ring batch itself when `rows` are all of its rows in order."""
    batch = rows[0].batch
    if (batch is not None and len(rows) == len(batch.array)
            and all(r.batch is batch and r.position == k for k, r in enumerate(rows))):
        return batch.output()
    return default_collate([np.asarray(r) for r in rows])


default_collate_fn_map[BatchRow] = collate_rows
