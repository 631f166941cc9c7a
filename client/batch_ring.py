"""Reused batch buffers: a batch is assembled once, into memory faulted in
when its buffer was made, and a buffer is reused only when nobody can still
be reading it.

A buffer is a memfd (anonymous shared memory: nothing in /dev/shm, freed
when its last mapping and descriptor go) of `capacity` data bytes and one
flag byte after them. It is busy while
- a lease of this process is alive: the batch array, any view or slice of
  it, a tensor made from it (numpy and torch keep the lease as their base);
- or its flag is set: the batch was handed to another process (DataLoader's
  main process) that has not dropped it yet; batch_handoff clears the flag
  there when the last reference goes.
An idle buffer is reused only once `keep` newer batches were handed out, so
a copy still in flight from a batch just dropped (`.to("cuda",
non_blocking=True)`) reads unchanged bytes. Code that keeps every batch
stays correct: the ring grows instead, and shrinks back once they go.
Without CUDA and outside DataLoader workers the same memory is plain; in a
process with CUDA that never hands batches over, buffers are pinned host
memory instead of a memfd.

The memory is the only thing a buffer owns: a batch arena the server writes
into (issue 17) can back a buffer in place of the memfd, with the same
lease, flag and reuse rule.
"""
import mmap
import os
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

Key = Tuple[int, int]          # (st_dev, st_ino): a memfd's identity in every process
POPULATE = getattr(mmap, "MAP_POPULATE", 0)
PAGE = mmap.PAGESIZE


class Buffer:
    """One batch's memory, faulted in once."""

    def __init__(self, capacity: int, pinned: bool = False) -> None:
        self.capacity = capacity
        self.fd: Optional[int] = None
        if pinned:
            import torch
            self._memory: Any = torch.empty(capacity + 1, dtype=torch.uint8, pin_memory=True)
            self.bytes = self._memory.numpy()
        else:
            self.fd = os.memfd_create("psana-ipc-batch", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, capacity + 1)
            self._memory = mmap.mmap(self.fd, capacity + 1, flags=mmap.MAP_SHARED | POPULATE)
            self.bytes = np.frombuffer(self._memory, np.uint8)
            if not POPULATE:
                self.bytes[::PAGE] = 0
        self.key = key_of(self.fd) if self.fd is not None else None
        self.kept = False             # in a ring, for reuse (else fresh for one batch)
        self.serial = -1              # the ring's count when last handed out
        self._lease: Optional[weakref.ref] = None

    @property
    def handed_over(self) -> bool:
        return bool(self.bytes[self.capacity])

    def hand_over(self) -> None:
        """Mark the batch as held by another process until it clears the flag."""
        self.bytes[self.capacity] = 1

    def idle(self) -> bool:
        return (self._lease is None or self._lease() is None) and not self.handed_over

    def lease(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """The first bytes as an array that keeps the buffer busy while it, or
        anything made from it, is alive."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        lease = _Lease(self.bytes[:nbytes].view(dtype).reshape(shape))
        self._lease = weakref.ref(lease)
        return np.asarray(lease)

    def close(self) -> None:
        """Give the memory back once nothing of this process uses it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._memory = self.bytes = None

    __del__ = close


def key_of(fd: int) -> Key:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Lease:
    """Exposes an array through `__array_interface__`; arrays and tensors made
    from it keep it (and so the buffer's busy state) alive."""

    def __init__(self, array: np.ndarray) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array = array


class BatchRing:
    """The buffers of one process (a forked DataLoader worker starts with none)."""

    def __init__(self, keep: int = 2) -> None:
        """`keep`: newer batches handed out before a buffer is reused, and idle
        buffers kept for reuse; 0 gives fresh memory to every batch."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.keep = keep
        self._buffers: List[Buffer] = []
        self._count = 0
        self._pid = os.getpid()
        self.retired: List[Key] = []      # closed shared buffers not yet announced

    def __getstate__(self) -> dict:
        return {"keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"])

    def lease(self, shape: Sequence[int], dtype: np.dtype, pinned: bool = False) -> Buffer:
        """A buffer for a batch of `shape`: an idle one old enough, else a new one."""
        if self._pid != os.getpid():      # forked: the parent's buffers are not ours to fill
            self._buffers, self._count, self._pid, self.retired = [], 0, os.getpid(), []
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        idle = [b for b in self._buffers if b.idle() and self._count - b.serial >= self.keep]
        chosen = next((b for b in sorted(idle, key=lambda b: b.serial)
                       if b.capacity >= nbytes and (b.fd is None) == pinned), None)
        if chosen is None:
            chosen = Buffer(nbytes, pinned)
            if self.keep:
                chosen.kept = True
                self._buffers.append(chosen)
        self._trim(chosen)
        chosen.serial = self._count
        self._count += 1
        return chosen

    def _trim(self, chosen: Buffer) -> None:
        """Close idle buffers beyond `keep` (the oldest first)."""
        idle = sorted((b for b in self._buffers if b is not chosen and b.idle()),
                      key=lambda b: b.serial)
        for buffer in idle[: max(0, len(idle) - self.keep)]:
            if buffer.key is not None:
                self.retired.append(buffer.key)
            buffer.close()
            self._buffers.remove(buffer)

    def __len__(self) -> int:
        return len(self._buffers)
