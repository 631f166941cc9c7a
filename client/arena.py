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

`arena_buffer` gives a batch_ring `Buffer` whose memory is an arena, so
IPCRemotePsanaDataset's batches (without DataLoader workers) are written in
place too, under the ring's own reuse rule.
"""
import os
from typing import Any, Callable, List, Sequence

import numpy as np

from psana_ipc.protocol.messages import Into
from psana_ipc.protocol.shm_names import segment_path

from .batch_ring import Buffer, lock
from .connection import Client
from .group import ConnectionGroup
from .shm import attach

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


class Arena:
    """One arena, mapped writable (the client's own memory, like any batch)."""

    def __init__(self, client: Client, nbytes: int, pin: bool) -> None:
        made = client.make_arena(nbytes)
        self.name, self.size = made.name, made.size
        self._client, self._generation = client, client.generation
        self.memory = attach(self.name, writable=True)
        self._pinned = _pin(self.memory) if pin else 0

    def alive(self) -> bool:
        """Its connection is the one that made it (else the server dropped it)."""
        return self._generation == self._client.generation

    def batch(self, count: int, frame_shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        return np.ndarray((count,) + tuple(frame_shape), dtype=dtype, buffer=self.memory)

    def close(self) -> None:
        if self._pinned:
            _unpin(self._pinned)
            self._pinned = 0
        try:
            self.memory.close()
        except BufferError:
            pass  # a batch still refers to it; the mapping goes with that batch


class ArenaRing:
    """`count` arenas of one batch each, reused in turn, spread over a group's
    connections (one `get` per connection names its part of the batch)."""

    def __init__(self, group: ConnectionGroup, count: int, frame_shape: Sequence[int],
                 dtype: np.dtype, batch_size: int, pin: bool) -> None:
        self.frame_shape, self.dtype = tuple(frame_shape), np.dtype(dtype)
        self.frame_nbytes = int(np.prod(self.frame_shape, dtype=np.int64)) * self.dtype.itemsize
        clients = group.clients
        self.arenas: List[Arena] = []
        try:
            for k in range(count):
                self.arenas.append(Arena(clients[k % len(clients)],
                                         batch_size * self.frame_nbytes, pin))
        except BaseException:
            self.close()
            raise

    def alive(self) -> bool:
        return all(a.alive() for a in self.arenas)

    def into(self, k: int) -> Callable[[int, int], Into]:
        """Where the frames of batch `k` go: for (first position, count) of one
        connection's part, the `into` of its get."""
        arena = self.arenas[k % len(self.arenas)]

        def part(start: int, count: int) -> Into:
            offsets = tuple((start + i) * self.frame_nbytes for i in range(count))
            return Into(arena.name, offsets, self.frame_shape, self.dtype.str)
        return part

    def batch(self, k: int, count: int) -> np.ndarray:
        return self.arenas[k % len(self.arenas)].batch(count, self.frame_shape, self.dtype)

    def close(self) -> None:
        for arena in self.arenas:
            arena.close()
        self.arenas = []


class ArenaBuffer(Buffer):
    """A ring buffer over an arena (its last byte is the ring's flag)."""

    def __init__(self, client: Client, capacity: int, pinned: bool) -> None:
        made = client.make_arena(capacity + 1)
        self.name = made.name
        self._client, self._generation = client, client.generation
        fd = os.open(segment_path(self.name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        super().__init__(capacity, fd=fd, locked=lock(fd))
        self.pinned = pinned
        self._pinned = _pin(self._memory) if pinned else 0

    def alive(self) -> bool:
        return self._generation == self._client.generation

    def close(self) -> None:
        if getattr(self, "_pinned", 0):
            _unpin(self._pinned)
            self._pinned = 0
        if getattr(self, "name", None) and self.alive():
            self._client.free_arena(self.name)
            self.name = None
        super().close()

    __del__ = close


def arena_buffer(group: ConnectionGroup) -> Callable[[int, bool], Buffer]:
    """A batch_ring `make` whose buffers are arenas, spread over the group's connections."""
    made = [0]

    def make(nbytes: int, pinned: bool) -> Buffer:
        clients = group.clients
        made[0] += 1
        return ArenaBuffer(clients[made[0] % len(clients)], nbytes, pinned)
    return make
