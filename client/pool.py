"""The server's pools as one client process sees them: mapped once per
process and server, and held, extent by extent, while something reads them.

A server hands its pools (protocol/pool.py) to local clients as
descriptors through its door, a UNIX socket the hello reply names. This
process asks once per server, maps each pool once, read-only (`writable`:
writable, for code that insists on writable arrays and does not write
them), and every connection, loader and dataset of the process shares that
mapping: a new consumer costs page tables, never fresh memory. A batch
buffer of the client's group is also mapped writable on its own
(`buffer`), so training code may change a batch in place. No descriptor
can change a pool's size (the server sealed it).

A hold is a read lock on one extent through a descriptor of its own (the
locks of one open file description merge, so two holds never share one):
while it is open, the server neither writes into the extent nor gives it
to another use, whatever happens to the connection or the server worker
that served it. It goes when its last descriptor closes (`close`, or when
the process ends; another process may have a copy: batch_handoff.py). A
frame's hold, which never leaves this process, unlocks its descriptor at
`close` instead and leaves it for the next hold: opening one costs more
than the lock. A hold is only good once the extent's ticket is the one
its reply named; else the extent went to another use first
(`FrameLost`). A forked child closes the holds it inherited, without
touching its parent's.
"""
import errno
import fcntl
import mmap
import os
import socket
import threading
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.pool import (F_OFD_GETLK, F_OFD_SETLK, F_RDLCK, F_UNLCK, F_WRLCK,
                                     MAX_DOOR_MESSAGE, TICKET_BYTES, decode_ticket, lock_found,
                                     lock_request, parse_door_message, ticket_offset)


BUFFER_MAPS = 64      # batch buffers' own mappings kept per server
SPARE_HOLDS = 64      # unlocked descriptors kept per pool for the next holds


class FrameLost(ConnectionError):
    """An extent went to another use before it was held: the server worker
    that served it died meanwhile. Ask again."""


class Hold:
    """A read lock on one extent (see the module docstring)."""

    __slots__ = ("fd", "_spares", "_range", "__weakref__")

    def __init__(self, fd: int, spares: Optional["_Spares"] = None, offset: int = 0,
                 size: int = 0) -> None:
        self.fd: Optional[int] = fd
        self._spares = spares         # where its descriptor goes back, unlocked, at close
        self._range = (offset, size)
        _holds.add(self)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None and not (self._spares is not None
                                   and self._spares.take_back(fd, *self._range)):
            os.close(fd)

    def disown(self) -> None:
        """In a forked child: its descriptor is its parent's too, never unlocked here."""
        self._spares = None

    def __del__(self) -> None:
        self.close()


class _Spares:
    """A pool's descriptors with no lock on them, for the next holds."""

    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd       # the pool's, new ones are opened from it
        self.free: List[int] = []

    def take(self) -> int:
        try:
            return self.free.pop()
        except IndexError:
            return _own_descriptor(self.fd)

    def take_back(self, fd: int, offset: int, size: int) -> bool:
        if self.fd is None or len(self.free) >= SPARE_HOLDS:
            return False
        fcntl.fcntl(fd, F_OFD_SETLK, lock_request(F_UNLCK, offset, size))
        self.free.append(fd)
        if self.fd is None:         # closed meanwhile, by another thread
            self.close()
        return True

    def close(self) -> None:
        self.fd = None
        while self.free:
            try:
                os.close(self.free.pop())
            except IndexError:      # emptied meanwhile, by another thread
                break


class Pools:
    """One server's pools in this process: descriptors and mappings."""

    def __init__(self, door: str, writable: bool = False) -> None:
        self.door = door
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            try:
                sock.connect(f"\0{door}")
                message, fds, _, _ = socket.recv_fds(sock, MAX_DOOR_MESSAGE, 4)
            except OSError as e:
                raise ConnectionError(f"cannot reach the server's shared memory at its door "
                                      f"({e}); connect with transport='inline'") from e
        pools = parse_door_message(message)
        if len(pools) != len(fds):
            raise ConnectionError("the server's door sent a message this client cannot read")
        self.fds: Dict[int, int] = {}
        self.spares: Dict[int, _Spares] = {}
        self.maps: Dict[int, mmap.mmap] = {}
        self._buffers: "OrderedDict[Tuple[int, int, int], mmap.mmap]" = OrderedDict()
        for (pool, size), fd in zip(pools, fds):
            os.set_inheritable(fd, False)
            self.fds[pool] = fd
            self.spares[pool] = _Spares(fd)
            writes = writable and _writable(fd)
            self.maps[pool] = mmap.mmap(fd, size, prot=mmap.PROT_READ
                                        | (mmap.PROT_WRITE if writes else 0))

    def view(self, pool: int, offset: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """An array over the pool's bytes: read it only while it is held."""
        return np.ndarray(tuple(shape), dtype=dtype, buffer=self.maps[pool], offset=offset)

    def buffer(self, pool: int, offset: int, nbytes: int) -> np.ndarray:
        """A batch buffer's bytes, writable, through a mapping of its own range
        kept for the next batches in it (the most recent BUFFER_MAPS)."""
        key = (pool, offset, nbytes)
        found = self._buffers.get(key)
        if found is None:
            found = self._buffers[key] = mmap.mmap(self.fds[pool], nbytes, offset=offset)
            while len(self._buffers) > BUFFER_MAPS:
                self._buffers.popitem(last=False)
        self._buffers.move_to_end(key)
        return np.frombuffer(found, np.uint8, nbytes)

    def hold(self, pool: int, offset: int, size: int, ticket: int, reuse: bool = False) -> Hold:
        """Hold an extent whose reply named `ticket` (FrameLost if it is no longer
        that). `reuse`: the hold never leaves this process, and its descriptor
        is reused once it is closed (see the module docstring)."""
        spares = self.spares[pool]
        hold = Hold(spares.take(), spares if reuse else None, offset, size)
        try:
            lock_range(hold.fd, offset, size)
        except BlockingIOError:
            hold.close()
            raise FrameLost("the frame's memory is being rewritten: the server worker that "
                            "served it died before it was held") from None
        at = ticket_offset(offset, size)
        if decode_ticket(self.maps[pool][at:at + TICKET_BYTES]) != ticket:
            hold.close()
            raise FrameLost("the frame's memory went to another use before it was held: the "
                            "server worker that served it died")
        return hold

    def claim(self, pool: int, offset: int, size: int) -> None:
        """This process's own hold on a range (a batch buffer it keeps), through
        its descriptor of the pool, which nothing else of this process locks."""
        fcntl.fcntl(self.fds[pool], F_OFD_SETLK, lock_request(F_RDLCK, offset, size))

    def unclaim(self, pool: int, offset: int, size: int) -> None:
        if pool in self.fds:
            fcntl.fcntl(self.fds[pool], F_OFD_SETLK, lock_request(F_UNLCK, offset, size))

    def held_elsewhere(self, pool: int, offset: int, size: int) -> bool:
        """Whether any hold but this process's own (a DataLoader main process
        still reading a batch, say) is on the range."""
        answer = fcntl.fcntl(self.fds[pool], F_OFD_GETLK, lock_request(F_WRLCK, offset, size))
        return lock_found(answer) is not None

    def close(self) -> None:
        """Drop the descriptors; each mapping goes when the last array over it does."""
        for fd in self.fds.values():
            os.close(fd)
        for spares in self.spares.values():
            spares.close()
        self.fds.clear()
        self.spares.clear()
        self.maps.clear()
        self._buffers.clear()

    def reopen(self) -> None:
        """In a forked child: descriptors of its own, so that its claims are its
        own (the parent's stay on the parent's)."""
        for pool, fd in list(self.fds.items()):
            flags = os.O_RDWR if _writable(fd) else os.O_RDONLY
            self.fds[pool] = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
            os.close(fd)
            self.spares[pool].close()
            self.spares[pool] = _Spares(self.fds[pool])


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR


def hold_range(fd: int, offset: int = 0, size: int = 0) -> Hold:
    """A hold on a range (0: to the end) of the file behind `fd`, through a
    new descriptor; BlockingIOError while someone writes there."""
    hold = Hold(_own_descriptor(fd))
    try:
        lock_range(hold.fd, offset, size)
    except OSError:
        hold.close()
        raise
    return hold


def _own_descriptor(fd: int) -> int:
    """A new open file description of the file behind `fd`, read-only: locks
    through it are its own."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def lock_range(fd: int, offset: int, size: int) -> None:
    """A read lock on a range through `fd`; BlockingIOError while someone writes there."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, lock_request(F_RDLCK, offset, size))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(e.errno, "the range is being written") from None
        raise


_lock = threading.Lock()
_pools: Dict[Tuple[str, bool], Tuple[Pools, int]] = {}     # -> (pools, connections using them)
_holds: "weakref.WeakSet[Hold]" = weakref.WeakSet()


def acquire(door: str, writable: bool = False) -> Pools:
    """This process's `Pools` for the server whose hello named `door`, for one
    more connection (give it back with `release`)."""
    with _lock:
        pools, users = _pools.get((door, writable), (None, 0))
        if pools is None:
            pools = Pools(door, writable)
        _pools[door, writable] = (pools, users + 1)
        return pools


def release(door: str, writable: bool = False) -> None:
    """A connection no longer uses the server's pools: with the last one, the
    descriptors go (the server's memory goes once the arrays over it do)."""
    with _lock:
        pools, users = _pools.get((door, writable), (None, 0))
        if pools is None:
            return
        if users > 1:
            _pools[door, writable] = (pools, users - 1)
        else:
            del _pools[door, writable]
            pools.close()


def _after_fork_in_child() -> None:
    """The child's copies of its parent's holds must not keep them alive, and
    its claims must not be its parent's."""
    global _lock
    _lock = threading.Lock()
    for hold in list(_holds):
        hold.disown()
        hold.close()
    for pools, _ in _pools.values():
        pools.reopen()


os.register_at_fork(after_in_child=_after_fork_in_child)
