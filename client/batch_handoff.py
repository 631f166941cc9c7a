"""Handing a batch from a DataLoader worker to the main process as a handle,
and keeping the buffers for the next epoch's workers.

torch (multiprocessing/reductions.py) sends a tensor whose storage is
already in shared memory as its file descriptor, without a copy, but maps it
afresh in the main process whenever the previous tensor on it is gone (a
page fault per page on first read), and never tells the worker when the main
process is done with it. A ring batch goes as a `SharedBatch` instead: the
buffer's descriptor (multiprocessing's DupFd, as torch does), shape and
dtype. The main process maps each buffer once and keeps descriptor and
mapping (`kept`), and returns a plain tensor whose last reference clears
the buffer's flag, which lets the worker reuse it (batch_ring).

Workers forked later (the next epoch, another DataLoader) inherit what the
main process keeps and claim idle buffers from it (`claim`) before making
new ones: memory is faulted in once per process tree, not once per epoch.
Buffers a worker closed travel with its next handle and are dropped here;
idle buffers nobody claims are kept up to `SPARE`.

A batch arena a worker made (the server wrote the batch in place) would go
with the worker's connection. The main process adopts it instead, on a
connection of the dataset's own group (`keep_arenas_for`; the server gives
the arena a new name, written into the buffer's trailer for the worker), so
it outlives the worker and later workers fill it again. Where it cannot
(no keeper registered, no room in the budget), the batch is used once.
"""
import fcntl
import mmap
import os
import threading
import weakref
from multiprocessing.reduction import DupFd
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, ServerError
from psana_ipc.protocol.messages import frame_nbytes

from .batch_ring import (TRAILER, Buffer, Key, fillable, key_of, lock, trailer_name,
                         write_trailer_name)

SPARE = 8
_lock = threading.Lock()


class _Kept:
    """A buffer the main process keeps: descriptor, mapping, live batches on it,
    and for an adopted arena the connection that keeps it."""

    def __init__(self, fd: int, capacity: int, group: Optional[str]) -> None:
        self.fd, self.capacity, self.group = fd, capacity, group
        self.memory = mmap.mmap(fd, capacity + TRAILER)
        self.bytes = np.frombuffer(self.memory, np.uint8)
        self.flag = self.bytes[capacity:capacity + 1]
        self.held: "weakref.WeakSet[_Held]" = weakref.WeakSet()
        self.keeper: Optional[Tuple[Any, int]] = None     # (Client, its generation)

    def alive(self) -> bool:
        return fillable(self.fd, self.group)

    def adopt(self) -> bool:
        """Keep the arena on a connection of its group's keeper (one more when
        those it has are at their fair share); False if none is registered or
        none has room."""
        group = _keepers.get(self.group)
        if group is None:
            return False
        name = trailer_name(self.bytes, self.capacity)
        for client in group.keepers():
            try:
                made = client.adopt_arena(name)
            except ServerError as e:
                if e.code == NO_MEMORY:
                    continue
                return False
            except OSError:
                return False
            write_trailer_name(self.bytes, self.capacity, made.name)
            self.keeper = (client, client.generation)
            return True
        return False

    def close(self) -> None:
        client, generation = self.keeper or (None, None)
        if client is not None and client.generation == generation:
            client.free_arena(trailer_name(self.bytes, self.capacity))
            try:
                client.flush_releases()
            except OSError:
                pass     # the connection is gone, and the arena with it
        os.close(self.fd)


_kept: Dict[Key, _Kept] = {}
_keepers: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def keep_arenas_for(group: Any) -> None:
    """Let the main process adopt the arenas that DataLoader workers make for
    this ConnectionGroup (its connections keep them; they go when it closes)."""
    _keepers[group.connect().group_id] = group


def forget_arenas_of(group_id: Optional[str]) -> None:
    """Drop the kept arenas of a group whose keeper is closing."""
    if group_id is None:
        return
    with _lock:
        for key, buffer in list(_kept.items()):
            if buffer.group == group_id:
                buffer.keeper = None
                buffer.close()
                del _kept[key]


class SharedBatch:
    """A ring batch on its way to another process (see the module docstring)."""

    def __init__(self, buffer: Buffer, array: np.ndarray, retired: List[Key]) -> None:
        self._buffer = buffer
        self._array = array          # holds the lease until the handle is sent
        self._retired = retired

    def __reduce__(self) -> Tuple[Any, Tuple]:
        self._buffer.hand_over()
        return (attach, (DupFd(self._buffer.fd), self._buffer.kept, self._buffer.capacity,
                         self._array.shape, self._array.dtype.str, self._retired,
                         self._buffer.group))


def attach(dup: Any, kept: bool, capacity: int, shape: Sequence[int], dtype: str,
           retired: List[Key], group: Optional[str] = None) -> Any:
    """In the receiving process: the batch as a tensor over the buffer's mapping,
    made once for a buffer the worker reuses (`kept`; an arena only if adopted)."""
    import torch
    fd = dup.detach()
    key = key_of(fd)
    with _lock:
        for old in retired:
            gone = _kept.pop(tuple(old), None)
            if gone is not None:
                gone.close()
        buffer = _kept.get(key)
        if buffer is not None:
            os.close(fd)
        else:
            buffer = _Kept(fd, capacity, group)
            if kept and (group is None or buffer.adopt()):
                _kept[key] = buffer
            else:
                buffer.close()
    nbytes = frame_nbytes(shape, np.dtype(dtype).itemsize)
    array = np.frombuffer(buffer.memory, np.uint8, nbytes).view(dtype).reshape(shape)
    held = _Held(array, buffer.flag)
    with _lock:
        buffer.held.add(held)
        if len(_kept) > SPARE:
            _tidy()
    return torch.from_numpy(np.asarray(held))


def _tidy() -> None:
    """Clear the flag of kept buffers no process uses and no batch here holds
    (their batch was lost on the way, say an iterator dropped mid-epoch), and
    close such idle buffers beyond SPARE, and dead arenas. The lock keeps
    workers out meanwhile. Runs whenever more than SPARE are kept."""
    idle = 0
    for key, buffer in list(_kept.items()):
        locked = lock(buffer.fd)
        if locked is None:
            continue
        try:
            if not buffer.held:
                buffer.flag[0] = 0
                idle += 1
                if idle > SPARE or not buffer.alive():
                    buffer.close()
                    del _kept[key]
        finally:
            fcntl.flock(locked, fcntl.LOCK_UN)
            os.close(locked)


def claim(nbytes: int, skip: List[Key], group: Optional[str] = None) -> Optional[Buffer]:
    """In a forked worker: an idle buffer of at least `nbytes` the main process
    kept (a memfd, or with `group` an arena of that connection group), now
    locked by this process; None if there is none."""
    for key, buffer in list(_kept.items()):
        if (key not in skip and buffer.group == group and buffer.capacity >= nbytes
                and not buffer.flag[0] and buffer.alive()):
            claimed = Buffer.claim(buffer.fd, buffer.capacity, group)
            if claimed is not None:
                return claimed
    return None


class _Held:
    """The received batch; clears the buffer's flag when the last tensor, view
    or array made from it goes. A finalizer may run on any thread: it only
    writes one byte of shared memory."""

    def __init__(self, array: np.ndarray, flag: np.ndarray) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array, self._flag = array, flag

    def __del__(self) -> None:
        self._flag[0] = 0
