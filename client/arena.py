"""Batch arenas as a client sees them: segments the server made for a
connection group, each holding one whole batch that the server's workers
write in place, frame k at k times the frame's size, so the batch is one
`(batch, *frame)` array over the mapping with no copy.

An arena belongs to the connection that asked for it and goes when that
connection closes (the server unlinks it; a mapping kept here stays
readable until dropped). A ring spreads its arenas over the group's
connections, so the memory counts against each connection's fair share of
the server's budget. With CUDA, each arena is registered once as pinned
host memory, so `batch.to("cuda", non_blocking=True)` copies straight from
what the server wrote.

One kind of arena, `ArenaBuffer` (a batch_ring `Buffer` whose memory is an
arena), under two reuse rules: BatchLoader's `ArenaRing` uses a fixed number
in turn; IPCRemotePsanaDataset's batch ring (`GroupArenas`) reuses one only
when nothing refers to its batch. In DataLoader workers the main process
adopts the arenas the workers make (batch_handoff), so they outlive the
workers and the next epoch's workers fill them again. `layout` is where a
get's frames go in an arena, for both.
"""
import os
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from psana_ipc.protocol.messages import Into, frame_nbytes
from psana_ipc.protocol.shm_names import segment_path

from . import batch_handoff
from .batch_ring import TRAILER, Buffer, Key, lock, write_trailer_name
from .connection import Client
from .group import ConnectionGroup

HOST_REGISTER_PORTABLE = 1      # pinned for every CUDA context, not only the current one


def _pin(memory: Any) -> int:
    """Register a mapping as pinned host memory when CUDA is there; its
    address, or 0 when nothing was registered."""
    import torch
    if not torch.cuda.is_available():
        return 0
    address = np.frombuffer(memory, np.uint8).ctypes.data
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(address, len(memory),
                                                                 HOST_REGISTER_PORTABLE))
    return address


def _unpin(address: int) -> None:
    import torch
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(address))


def layout(name: str, start: int, count: int, frame_shape: Sequence[int],
           dtype: np.dtype) -> Into:
    """The `into` of a get whose `count` frames go to positions `start`... of
    the batch in arena `name`."""
    nbytes = frame_nbytes(frame_shape, np.dtype(dtype).itemsize)
    return Into(name, tuple((start + i) * nbytes for i in range(count)), tuple(frame_shape),
                np.dtype(dtype).str)


class ArenaRing:
    """`count` arenas of one batch each, reused in turn (BatchLoader's rule),
    spread over a group's connections (one `get` per connection names its
    part of the batch)."""

    def __init__(self, group: ConnectionGroup, count: int, frame_shape: Sequence[int],
                 dtype: np.dtype, batch_size: int, pin: bool) -> None:
        self.frame_shape, self.dtype = tuple(frame_shape), np.dtype(dtype)
        nbytes = batch_size * frame_nbytes(self.frame_shape, self.dtype.itemsize)
        clients = group.clients
        self.arenas: List[ArenaBuffer] = []
        try:
            for k in range(count):
                self.arenas.append(ArenaBuffer(clients[k % len(clients)], nbytes, pin, wait=True))
        except BaseException:
            self.close()
            raise

    def alive(self) -> bool:
        return all(a.alive() for a in self.arenas)

    def into(self, k: int) -> Callable[[int, int], Into]:
        """Where the frames of batch `k` go: for (first position, count) of one
        connection's part, the `into` of its get."""
        name = self.arenas[k % len(self.arenas)].name
        return lambda start, count: layout(name, start, count, self.frame_shape, self.dtype)

    def batch(self, k: int, count: int) -> np.ndarray:
        arena = self.arenas[k % len(self.arenas)]
        return arena.bytes[:arena.capacity].view(self.dtype).reshape(
            (-1,) + self.frame_shape)[:count]

    def close(self) -> None:
        for arena in self.arenas:
            arena.close()
        self.arenas = []


class ArenaBuffer(Buffer):
    """A ring buffer over an arena this process made (see batch_ring); `wait`:
    for room in the budget (else `no_memory` at once)."""

    def __init__(self, client: Client, capacity: int, pinned: bool, wait: bool = False) -> None:
        made = client.make_arena(capacity + TRAILER, wait=wait)
        self._client, self._generation, self._made = client, client.generation, made.name
        fd = os.open(segment_path(self._made), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        super().__init__(capacity, fd=fd, locked=lock(fd), group=client.group)
        write_trailer_name(self.bytes, capacity, self._made)
        self.pinned = pinned
        self._pinned = _pin(self._memory) if pinned else 0

    def _settle(self) -> None:
        """Once the main process adopted the arena (a new name in the trailer),
        tell this connection to stop counting the old name."""
        if self._made is not None and self.name != self._made:
            self._client.free_arena(self._made)
            self._made = None

    def alive(self) -> bool:
        """This process's own arena lives while its connection does; an
        adopted one while its new name exists."""
        self._settle()
        if self._made is not None and self._generation != self._client.generation:
            return False
        return super().alive()

    def close(self) -> None:
        if getattr(self, "_pinned", 0):
            _unpin(self._pinned)
            self._pinned = 0
        if getattr(self, "_made", None) is not None and self.bytes is not None:
            self._settle()
            if self._made is not None and self._generation == self._client.generation:
                self._client.free_arena(self._made)
            self._made = None
        super().close()

    __del__ = close


class GroupArenas:
    """Where a ring of batch arenas gets its buffers: an idle arena the main
    process kept for this connection group (a DataLoader worker of a later
    epoch claims it), else a new arena on one of the group's connections in
    turn. Picklable, for spawned DataLoader workers."""

    def __init__(self, group: ConnectionGroup) -> None:
        self._group = group
        self._made = 0

    def make(self, nbytes: int, pinned: bool) -> Buffer:
        clients = self._group.clients
        self._made += 1
        return ArenaBuffer(clients[self._made % len(clients)], nbytes, pinned)

    def claim(self, nbytes: int, skip: List[Key]) -> Optional[Buffer]:
        return batch_handoff.claim(nbytes, skip, self._group.connect().group_id)
