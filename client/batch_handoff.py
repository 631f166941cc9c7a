"""Handing a batch from a DataLoader worker to the main process as a handle.

torch (multiprocessing/reductions.py) sends a tensor whose storage is
already in shared memory as its file descriptor, without a copy, but maps it
afresh in the main process whenever the previous tensor on it is gone (a
page fault per page on first read), and never tells the worker when the main
process is done with it. A ring batch goes as a `SharedBatch` instead: the
buffer's descriptor (multiprocessing's DupFd, as torch does), shape and
dtype. The main process maps each buffer once, keeps the mapping for the
next batches in it, and returns a plain tensor whose last reference clears
the buffer's flag, which lets the worker reuse it (batch_ring). Buffers the
worker closed travel with the next handle, so the main process drops their
mappings; those of workers that exited go when the next worker shows up.
"""
import mmap
import os
import threading
from multiprocessing.reduction import DupFd
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .batch_ring import Buffer, Key, key_of

_mappings: Dict[Key, Tuple[int, mmap.mmap]] = {}     # key -> (worker pid, mapping)
_lock = threading.Lock()


class SharedBatch:
    """A ring batch on its way to another process (see the module docstring)."""

    def __init__(self, buffer: Buffer, array: np.ndarray, retired: List[Key]) -> None:
        self._buffer = buffer
        self._array = array          # holds the lease until the handle is sent
        self._retired = retired

    def __reduce__(self) -> Tuple[Any, Tuple]:
        self._buffer.hand_over()
        return (attach, (DupFd(self._buffer.fd), os.getpid(), self._buffer.kept,
                         self._buffer.capacity, self._array.shape, self._array.dtype.str,
                         self._retired))


def attach(dup: Any, worker: int, kept: bool, capacity: int, shape: Sequence[int],
           dtype: str, retired: List[Key]) -> Any:
    """In the receiving process: the batch as a tensor over the buffer's mapping,
    made once for a buffer the worker reuses (`kept`)."""
    import torch
    fd = dup.detach()
    try:
        key = key_of(fd)
        with _lock:
            for old in retired:
                _mappings.pop(tuple(old), None)
            if key in _mappings:
                memory = _mappings[key][1]
            else:
                memory = mmap.mmap(fd, capacity + 1)
                if kept:
                    _forget_exited_workers()
                    _mappings[key] = (worker, memory)
    finally:
        os.close(fd)
    flag = np.frombuffer(memory, np.uint8, 1, capacity)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    array = np.frombuffer(memory, np.uint8, nbytes).view(dtype).reshape(shape)
    return torch.from_numpy(np.asarray(_Held(array, flag)))


def _forget_exited_workers() -> None:
    for key, (pid, _) in list(_mappings.items()):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            del _mappings[key]


class _Held:
    """The received batch; clears the buffer's flag when the last tensor, view
    or array made from it goes. A finalizer may run on any thread: it only
    writes one byte of shared memory."""

    def __init__(self, array: np.ndarray, flag: np.ndarray) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array, self._flag = array, flag

    def __del__(self) -> None:
        self._flag[0] = 0
