"""The batch buffers of one process, reused: a batch is written once into
memory that was there before, and a buffer is reused only when nobody can
still be reading it. BatchLoader and the datasets keep theirs here.

A buffer is either
- a batch buffer in the server's pool (`PoolBuffer`): the server's workers
  write every frame of a batch straight into its place, so the batch is one
  array over the pool with no copy here. It belongs to the client's
  connection group (client/group.py) and lives while the group does; this
  process claims it (a read lock through its own descriptor of the pool,
  client/pool.py), so the server gives it to nobody else meanwhile;
- or memory this process fills by copying frames (`MemfdBuffer`: a memfd,
  or pinned host memory where CUDA is there and nothing crosses processes),
  for frames that arrive inline or have to be assembled.

A buffer is busy while
- a lease of this process is alive: the batch array, any view or slice of
  it, a tensor made from it (numpy and torch keep the lease as their base);
- or another process holds it: a batch handed to DataLoader's main process
  travels with a hold of its own (batch_handoff.py), which that process
  keeps until it drops the batch.
In the process that iterates, an idle buffer is reused only once `keep`
newer batches were handed out, so a copy still in flight from a batch just
dropped (`.to("cuda", non_blocking=True)` from pinned memory) reads
unchanged bytes. Code that keeps every batch stays correct: the ring grows
instead, and shrinks back to `keep` idle buffers once they go.
"""
import fcntl
import mmap
import os
import time
import weakref
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, ServerError
from psana_ipc.protocol.messages import Into, frame_nbytes
from psana_ipc.protocol.pool import (F_OFD_GETLK, F_WRLCK, TICKET_BYTES, lock_found,
                                     lock_request)
from psana_ipc.protocol.replies import ArenaMade

from .client import Client
from .group import ConnectionGroup
from .pool import Hold, hold_range

POPULATE = getattr(mmap, "MAP_POPULATE", 0)
HOST_REGISTER_PORTABLE = 1      # pinned for every CUDA context, not only the current one
OWN_WAIT = 30.0                 # seconds a ring the server has no room for waits for its own


class Buffer:
    """One batch's memory (see the module docstring)."""

    client: Optional[Client] = None      # the connection it was made on, if any

    def __init__(self, capacity: int, memory: Any, pinned: bool) -> None:
        self.capacity = capacity
        self.memory = memory                 # what keeps the bytes mapped
        self.bytes = np.frombuffer(memory, np.uint8, capacity) if not pinned \
            else memory.numpy()[:capacity]
        self.pinned = pinned
        self.kept = False             # in a ring, for reuse (else fresh for one batch)
        self.serial = -1              # the ring's count when last handed out
        self._lease: Optional[weakref.ref] = None

    def lease(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """The first bytes as an array that keeps the buffer busy while it, or
        anything made from it, is alive."""
        nbytes = frame_nbytes(shape, dtype.itemsize)
        lease = _Lease(self.bytes[:nbytes].view(dtype).reshape(shape))
        self._lease = weakref.ref(lease)
        return np.asarray(lease)

    def idle(self) -> bool:
        return (self._lease is None or self._lease() is None) and not self.held_elsewhere()

    def held_elsewhere(self) -> bool:
        """Whether another process still holds the batch."""
        return False

    def alive(self) -> bool:
        """Whether the buffer can still be filled."""
        return True

    def hold(self) -> Hold:
        """A new hold on the buffer, to go with a batch to another process."""
        raise NotImplementedError

    def close(self) -> None:
        self.memory = self.bytes = None


class PoolBuffer(Buffer):
    """A batch buffer of the client's group in the server's pool."""

    def __init__(self, client: Client, made: ArenaMade, capacity: int, pinned: bool) -> None:
        self.client, self.generation, self.pools = client, client.generation, client.pools
        self.ticket, self.pool, self.offset = made.arena, made.pool, made.offset
        self.size = made.size
        self.pools.claim(self.pool, self.offset, self.size)
        view = self.pools.buffer(self.pool, self.offset, made.size - TICKET_BYTES)
        super().__init__(capacity, view, False)
        self._registered = _pin(view) if pinned else 0
        self.pinned = pinned

    @property
    def door(self) -> str:
        return self.pools.door

    def held_elsewhere(self) -> bool:
        """Never asked of a server this process no longer talks to (its pool is
        not open here): a buffer whose group went is never filled again, and
        only this process's own use of it keeps it."""
        return self.alive() and self.pools.held_elsewhere(self.pool, self.offset, self.size)

    def alive(self) -> bool:
        """Its group lives while the connection that asked for it does: made on
        the connection as it is now, not one forgotten since (one the server
        closed, a restarted server's: see BatchRing.lease)."""
        return self.generation == self.client.generation

    def hold(self) -> Hold:
        return self.pools.hold(self.pool, self.offset, self.size, self.ticket)

    def into(self, start: int, count: int, frame_shape: Sequence[int], dtype: np.dtype) -> Into:
        """The `into` of a get whose `count` frames go to positions `start`...
        of the batch in this buffer."""
        nbytes = frame_nbytes(frame_shape, np.dtype(dtype).itemsize)
        return Into(self.ticket, tuple((start + i) * nbytes for i in range(count)),
                    tuple(frame_shape), np.dtype(dtype).str)

    def close(self) -> None:
        if self.bytes is None:
            return
        if self._registered:
            _unpin(self._registered)
        self.pools.unclaim(self.pool, self.offset, self.size)
        if self.alive():
            self.client.free_arena(self.ticket)
        super().close()


class GroupBuffers:
    """Makes the batch buffers of a connection group, on its connections in
    turn; `wait` for room in the budget (else `no_memory` at once).
    Picklable, for spawned DataLoader workers."""

    def __init__(self, group: ConnectionGroup, wait: bool = False) -> None:
        self.group, self.wait = group, wait
        self._made = 0

    def __call__(self, nbytes: int, pinned: bool) -> Buffer:
        return self.several(1, nbytes, pinned)[0]

    def several(self, count: int, nbytes: int, pinned: bool, least: int = 1) -> List[Buffer]:
        """`count` buffers asked at once, so that their round trips overlap:
        as many as the budget has room for, at least `least` (else none, and
        ServerError `no_memory` as for one)."""
        clients = self.group.clients
        asked = []
        for _ in range(count):
            self._made += 1
            client = clients[self._made % len(clients)]
            asked.append((client, client.ask_arena(nbytes, self.wait)))
        made, refusals = [], []
        for client, rid in asked:        # every reply read before anything is raised
            try:
                made.append((client, client.arena_made(rid)))
            except ServerError as e:
                refusals.append(e)
        failed = [e for e in refusals if e.code != NO_MEMORY]
        if failed or len(made) < least:
            for client, reply in made:
                client.free_arena(reply.arena)
            raise (failed or refusals)[0]
        return [PoolBuffer(client, reply, nbytes, pinned) for client, reply in made]


class MemfdBuffer(Buffer):
    """Memory this process fills: a memfd (pinned host memory when `pinned`),
    faulted in once."""

    def __init__(self, capacity: int, pinned: bool = False) -> None:
        self.fd: Optional[int] = None
        if pinned:
            import torch
            memory: Any = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        else:
            self.fd = os.memfd_create("psana-ipc-batch", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, max(1, capacity))
            memory = mmap.mmap(self.fd, max(1, capacity), flags=mmap.MAP_SHARED | POPULATE)
        super().__init__(capacity, memory, pinned)
        if not pinned and not POPULATE:
            self.bytes[::mmap.PAGESIZE] = 0

    def held_elsewhere(self) -> bool:
        if self.fd is None:
            return False
        answer = fcntl.fcntl(self.fd, F_OFD_GETLK, lock_request(F_WRLCK, 0, 0))
        return lock_found(answer) is not None

    def hold(self) -> Hold:
        return hold_range(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


class _Lease:
    """Exposes an array through `__array_interface__`; arrays and tensors made
    from it keep it (and so the buffer's busy state) alive."""

    def __init__(self, array: np.ndarray) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array = array


Make = Callable[[int, bool], Buffer]                      # (bytes, pinned) -> a new buffer


class BatchRing:
    """The buffers of one process (a forked DataLoader worker starts with none)."""

    def __init__(self, make: Make, keep: int = 2, spare: Optional[int] = None) -> None:
        """`make`: a new buffer; `keep`: newer batches handed out before a
        buffer is reused (0 gives fresh memory to every batch); `spare`: idle
        buffers kept for reuse (default `keep`)."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.keep = keep
        self.spare = keep if spare is None else spare
        self._make = make
        self._buffers: List[Buffer] = []
        self._count = 0
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"keep": self.keep, "spare": self.spare, "make": self._make}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["make"], state["keep"], state["spare"])

    def lease(self, nbytes: int, handed_over: bool, pinned: bool = False) -> Buffer:
        """A buffer of at least `nbytes` for a batch (for another process if
        `handed_over`): an idle one old enough, else a new one."""
        self._own()
        for client in {b.client for b in self._buffers} - {None}:
            client.forget_if_closed()     # closed while idle (a restart): its buffers went
        spacing = 0 if handed_over else self.keep
        chosen = self._idle(nbytes, pinned, spacing) or self._new(nbytes, pinned, spacing)
        if self.keep and not chosen.kept:
            chosen.kept = True
            self._buffers.append(chosen)
        self._trim(chosen)
        chosen.serial = self._count
        self._count += 1
        return chosen

    def _own(self) -> None:
        if self._pid != os.getpid():      # forked: the parent's buffers are not ours to fill
            self._buffers, self._count, self._pid = [], 0, os.getpid()

    def _idle(self, nbytes: int, pinned: bool, spacing: int) -> Optional[Buffer]:
        """The oldest idle buffer that fits, at least `spacing` batches old."""
        idle = [b for b in self._buffers
                if b.alive() and self._count - b.serial >= spacing and b.idle()]
        return next((b for b in sorted(idle, key=lambda b: b.serial)
                     if b.capacity >= nbytes and b.pinned == pinned), None)

    def _new(self, nbytes: int, pinned: bool, spacing: int) -> Buffer:
        """A new buffer; when the server has no room for one (the budget full of
        this ring's batches, which a DataLoader's main process holds until its
        loop has used them), one of the ring's own once it comes back, waited
        for at most OWN_WAIT."""
        try:
            return self._made(nbytes, pinned)
        except ServerError as e:
            if e.code != NO_MEMORY or not any(b.alive() and b.capacity >= nbytes
                                              for b in self._buffers):
                raise
            deadline = time.monotonic() + OWN_WAIT
            while time.monotonic() < deadline:
                time.sleep(0.002)
                chosen = self._idle(nbytes, pinned, spacing)
                if chosen is not None:
                    return chosen
            raise

    def _made(self, nbytes: int, pinned: bool) -> Buffer:
        """A new buffer. A group's come with the rest the ring keeps (up to
        `spare`), asked in one round trip, which a new DataLoader worker's
        first batches would otherwise wait for in turn."""
        ahead = self.keep and isinstance(self._make, GroupBuffers)
        first, *rest = self._several(max(1, self.spare - len(self._buffers)) if ahead else 1,
                                     nbytes, pinned, least=1)
        self._keep_idle(rest)
        return first

    def _several(self, count: int, nbytes: int, pinned: bool, least: int) -> List[Buffer]:
        """`count` new buffers (at least `least`): a group's asked for together,
        this process's made one by one."""
        if isinstance(self._make, GroupBuffers):
            return self._make.several(count, nbytes, pinned, least)
        return [self._make(nbytes, pinned) for _ in range(count)]

    def _keep_idle(self, buffers: List[Buffer]) -> None:
        for buffer in buffers:
            buffer.kept = True
            buffer.serial = self._count - self.keep       # free to use at once
            self._buffers.append(buffer)

    def fill(self, count: int, nbytes: int, pinned: bool = False) -> None:
        """Make buffers until the ring has `count` (a loader's buffers taken
        before its first request: where they cannot all be had, it knows
        before anything was asked)."""
        self._own()
        missing = min(count, self.spare) - len(self._buffers)
        if missing > 0:
            self._keep_idle(self._several(missing, nbytes, pinned, least=missing))

    def _trim(self, chosen: Buffer) -> None:
        """Close idle buffers beyond `spare` (the oldest first), and dead ones."""
        idle = sorted(((b.alive(), b.serial, b) for b in self._buffers
                       if b is not chosen and b.idle()), key=lambda t: t[:2])
        dead = sum(not live for live, _, _ in idle)
        for _, _, buffer in idle[: max(dead, len(idle) - self.spare)]:
            buffer.close()
            self._buffers.remove(buffer)

    def close(self) -> None:
        """Give every buffer back (arrays still over them stay readable)."""
        for buffer in self._buffers:
            buffer.close()
        self._buffers = []

    def __len__(self) -> int:
        return len(self._buffers)


def _pin(memory: np.ndarray) -> int:
    """Register memory as pinned host memory when CUDA is there; its address,
    or 0 when nothing was registered."""
    import torch
    if not torch.cuda.is_available():
        return 0
    address = memory.ctypes.data
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(address, memory.nbytes,
                                                                 HOST_REGISTER_PORTABLE))
    return address


def _unpin(address: int) -> None:
    import torch
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(address))
