"""Handing a batch from a DataLoader worker to the main process as a handle.

torch (multiprocessing/reductions.py) sends a tensor whose storage is in
shared memory as its file descriptor, but maps it afresh in the main
process for every batch and never tells the worker when the main process
is done with it. A ring batch (batch_ring.py) goes as a `SharedBatch`
instead: where it is, its shape and dtype, and a hold of its own on its
memory (client/pool.py), as a descriptor (multiprocessing's DupFd, as torch
does). The main process keeps the hold while any tensor made from the batch
is alive; meanwhile the worker's ring sees the buffer held and fills
another, and the server gives the memory to no other use, even if the
worker and its connections are gone. A batch in the server's pool is mapped
through the main process's own mapping of the pool, made once; a batch the
worker copied into a memfd is mapped from the descriptor.
"""
import mmap
from multiprocessing.reduction import DupFd
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.messages import frame_nbytes

from . import pool
from .batch_ring import Buffer, PoolBuffer
from .pool import Hold


class SharedBatch:
    """A ring batch on its way to another process (see the module docstring)."""

    def __init__(self, buffer: Buffer, array: np.ndarray) -> None:
        self._buffer = buffer
        self._array = array          # holds the lease until the handle is sent

    def __reduce__(self) -> Tuple[Any, Tuple]:
        hold = self._buffer.hold()
        where = ((self._buffer.door, self._buffer.pool, self._buffer.offset)
                 if isinstance(self._buffer, PoolBuffer) else None)
        try:
            return (attach, (DupFd(hold.fd), where, self._array.shape, self._array.dtype.str))
        finally:
            hold.close()        # DupFd keeps a copy until the receiver has its own


def attach(dup: Any, where: Optional[Tuple[str, int, int]], shape: Sequence[int],
           dtype: str) -> Any:
    """In the receiving process: the batch as a tensor, holding its memory
    until the last tensor, view or array made from it goes."""
    import torch
    hold = Hold(dup.detach())
    nbytes = frame_nbytes(shape, np.dtype(dtype).itemsize)
    if where is None:       # copy-on-write: the worker never writes it again while held
        memory: Any = mmap.mmap(hold.fd, max(1, nbytes), flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        array = np.frombuffer(memory, np.uint8, nbytes)
        door = None
    else:
        door, pool_id, offset = where
        array = pool.acquire(door).buffer(pool_id, offset, nbytes)
    return torch.from_numpy(np.asarray(_Held(array.view(dtype).reshape(shape), hold, door)))


class _Held:
    """The received batch; its hold (and the pools, for a batch in the pool)
    goes when the last tensor, view or array made from it goes."""

    def __init__(self, array: np.ndarray, hold: Hold, door: Optional[str]) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array, self._hold, self._door = array, hold, door

    def __del__(self) -> None:
        self._hold.close()
        if self._door is not None:
            pool.release(self._door)

