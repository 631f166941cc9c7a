"""Reused batch buffers: a batch is assembled once, into memory faulted in
when its buffer was made, and a buffer is reused only when nobody can still
be reading it.

A buffer is a memfd (anonymous shared memory: nothing in /dev/shm, freed
when its last mapping and descriptor go), or a batch arena the server
writes into (client/arena.py), of `capacity` data bytes and a trailer after
them: a flag byte, then the arena's current name (an arena the main process
adopted gets a new name there, which the worker that made it reads). It is
busy while
- a lease of this process is alive: the batch array, any view or slice of
  it, a tensor made from it (numpy and torch keep the lease as their base);
- or its flag is set: the batch was handed to another process (DataLoader's
  main process) that has not dropped it yet; batch_handoff clears the flag
  there when the last reference goes.
In the process that iterates, an idle buffer is reused only once `keep`
newer batches were handed out, so a copy still in flight from a batch just
dropped (`.to("cuda", non_blocking=True)` from pinned memory) reads
unchanged bytes; batches handed to another process are reused as soon as
it drops them (what it received is not pinned: DataLoader's pin_memory
copies it). Code that keeps every batch stays correct: the ring grows
instead, and shrinks back to `keep` idle buffers once they go.

The process using a buffer holds an exclusive flock on a descriptor of its
own. DataLoader's main process keeps the buffers its workers handed over,
so the workers of the next epoch (forked from it) claim those instead of
faulting in new memory (`claimed`); the lock makes sure two live processes
never fill the same buffer, and goes with the process. In a process with
CUDA that never hands batches over, buffers are pinned host memory instead.

The memory is the only thing a buffer owns: a batch arena backs a buffer
in place of the memfd with the same lease, flag, lock and reuse rule; it is
alive while its name exists (the server unlinks the arenas of a connection
that closes).
"""
import fcntl
import mmap
import os
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.messages import frame_nbytes

Key = Tuple[int, int]          # (st_dev, st_ino): a memfd's identity in every process
POPULATE = getattr(mmap, "MAP_POPULATE", 0)
PAGE = mmap.PAGESIZE
TRAILER = 64                   # flag byte, name length byte, arena name


def trailer_name(memory: np.ndarray, capacity: int) -> Optional[str]:
    """The arena name in a buffer's trailer (None for a memfd)."""
    n = int(memory[capacity + 1])
    return bytes(memory[capacity + 2:capacity + 2 + n]).decode() if n else None


def write_trailer_name(memory: np.ndarray, capacity: int, name: str) -> None:
    raw = name.encode()
    if len(raw) > TRAILER - 2:
        raise ValueError(f"arena name {name!r} does not fit a buffer's trailer")
    memory[capacity + 2:capacity + 2 + len(raw)] = np.frombuffer(raw, np.uint8)
    memory[capacity + 1] = len(raw)


def fillable(fd: Optional[int], group: Optional[str]) -> bool:
    """Whether a buffer's memory can still be filled: a memfd always, a batch
    arena (it has a `group`) while its name exists."""
    return group is None or os.fstat(fd).st_nlink > 0


def key_of(fd: int) -> Key:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def lock(fd: int) -> Optional[int]:
    """A private descriptor of the same memory, exclusively locked; None when
    another descriptor holds the lock (another process uses the buffer)."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(own)
        return None
    return own


class Buffer:
    """One batch's memory, faulted in once."""

    def __init__(self, capacity: int, pinned: bool = False, fd: Optional[int] = None,
                 locked: Optional[int] = None, group: Optional[str] = None) -> None:
        """A new buffer, or (`fd`, `locked`) one this process claimed; `group`:
        the connection group of an arena (whose pages the server writes, so
        they are not faulted in here)."""
        self.capacity = capacity
        self.fd = fd
        self.pinned = pinned
        self.group = group
        self._locked = locked
        size = capacity + TRAILER
        if pinned:
            import torch
            self._memory: Any = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self.bytes = self._memory.numpy()
        else:
            if self.fd is None:
                self.fd = os.memfd_create("psana-ipc-batch", os.MFD_CLOEXEC)
                os.ftruncate(self.fd, size)
                self._locked = lock(self.fd)
            populate = POPULATE if group is None else 0
            self._memory = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | populate)
            self.bytes = np.frombuffer(self._memory, np.uint8)
            if group is None and not POPULATE:
                self.bytes[::PAGE] = 0
        self.key = key_of(self.fd) if self.fd is not None else None
        self.kept = False             # in a ring, for reuse (else fresh for one batch)
        self.serial = -1              # the ring's count when last handed out
        self._lease: Optional[weakref.ref] = None

    @classmethod
    def claim(cls, fd: int, capacity: int, group: Optional[str] = None) -> Optional["Buffer"]:
        """The buffer behind `fd` (another process made it), unless a live
        process uses it or its last batch is still held."""
        locked = lock(fd)
        if locked is None:
            return None
        buffer = cls(capacity, fd=os.dup(fd), locked=locked, group=group)
        if buffer.handed_over:
            buffer.close()
            return None
        return buffer

    @property
    def handed_over(self) -> bool:
        return bool(self.bytes[self.capacity])

    def hand_over(self) -> None:
        """Mark the batch as held by another process until it clears the flag."""
        self.bytes[self.capacity] = 1

    def idle(self) -> bool:
        return (self._lease is None or self._lease() is None) and not self.handed_over

    @property
    def name(self) -> Optional[str]:
        """The arena's current name (None for a memfd)."""
        return trailer_name(self.bytes, self.capacity)

    def alive(self) -> bool:
        """The memory can still be filled (see `fillable`)."""
        return fillable(self.fd, self.group)

    def lease(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """The first bytes as an array that keeps the buffer busy while it, or
        anything made from it, is alive."""
        nbytes = frame_nbytes(shape, dtype.itemsize)
        lease = _Lease(self.bytes[:nbytes].view(dtype).reshape(shape))
        self._lease = weakref.ref(lease)
        return np.asarray(lease)

    def close(self) -> None:
        """Give the memory back once nothing of this process uses it."""
        for fd in (getattr(self, "fd", None), getattr(self, "_locked", None)):
            if fd is not None:
                os.close(fd)
        self.fd = self._locked = None
        self._memory = self.bytes = None

    __del__ = close


class _Lease:
    """Exposes an array through `__array_interface__`; arrays and tensors made
    from it keep it (and so the buffer's busy state) alive."""

    def __init__(self, array: np.ndarray) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array = array


Claimed = Callable[[int, List[Key]], Optional[Buffer]]   # (bytes, keys not to try) -> buffer
Make = Callable[[int, bool], Buffer]                      # (bytes, pinned) -> a new buffer


class BatchRing:
    """The buffers of one process (a forked DataLoader worker starts with none)."""

    def __init__(self, keep: int = 2, claimed: Optional[Claimed] = None,
                 make: Make = Buffer) -> None:
        """`keep`: newer batches handed out before a buffer is reused, and idle
        buffers kept for reuse; 0 gives fresh memory to every batch.
        `claimed`: finds a buffer left by an earlier process to use first.
        `make`: a new buffer (batch arenas make theirs)."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.keep = keep
        self._claimed = claimed
        self._make = make
        self._buffers: List[Buffer] = []
        self._count = 0
        self._pid = os.getpid()
        self.retired: List[Key] = []      # closed shared buffers not yet announced

    def __getstate__(self) -> dict:
        return {"keep": self.keep, "claimed": self._claimed, "make": self._make}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"], state["claimed"], state["make"])

    def lease(self, shape: Sequence[int], dtype: np.dtype, handed_over: bool,
              pinned: bool = False) -> Buffer:
        """A buffer for a batch of `shape` (for another process if `handed_over`):
        an idle one old enough, else one claimed from an earlier process, else
        a new one."""
        if self._pid != os.getpid():      # forked: the parent's buffers are not ours to fill
            self._buffers, self._count, self._pid, self.retired = [], 0, os.getpid(), []
        nbytes = frame_nbytes(shape, np.dtype(dtype).itemsize)
        spacing = 0 if handed_over else self.keep
        idle = [b for b in self._buffers
                if b.idle() and b.alive() and self._count - b.serial >= spacing]
        chosen = next((b for b in sorted(idle, key=lambda b: b.serial)
                       if b.capacity >= nbytes and b.pinned == pinned), None)
        if chosen is None and self.keep and not pinned and self._claimed is not None:
            chosen = self._claimed(nbytes, [b.key for b in self._buffers])
        if chosen is None:
            chosen = self._make(nbytes, pinned)
        if self.keep and not chosen.kept:
            chosen.kept = True
            self._buffers.append(chosen)
        self._trim(chosen)
        chosen.serial = self._count
        self._count += 1
        return chosen

    def _trim(self, chosen: Buffer) -> None:
        """Close idle buffers beyond `keep` (the oldest first), and dead ones."""
        idle = sorted(((b.alive(), b.serial, b) for b in self._buffers
                       if b is not chosen and b.idle()), key=lambda t: t[:2])
        dead = sum(not live for live, _, _ in idle)
        for _, _, buffer in idle[: max(dead, len(idle) - self.keep)]:
            if buffer.key is not None and buffer.group is None:
                self.retired.append(buffer.key)     # an arena is its keeper's to drop
            buffer.close()
            self._buffers.remove(buffer)

    def __len__(self) -> int:
        return len(self._buffers)
