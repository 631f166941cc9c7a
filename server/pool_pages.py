"""The pages of the server's pool: the files frame memory lives in, each
worker's mapping of them, and the locks that say who holds what.

A pool is one file the master makes before forking, of a fixed size, with
no name anywhere: in memory, a memfd sealed against shrinking and growing
(nobody, client or not, can truncate it under a worker writing into it:
no SIGBUS); on disk (`--frame-cache-dir`), a file opened with O_TMPFILE in
that directory. Either way its pages go back to the node when the last
descriptor and mapping go, however the server ends, so a killed server
leaves nothing behind to clean up. Local clients get a descriptor through
the door (door.py); nothing they can do with it changes the file's size.

The file is sparse: pages are taken (`posix_fallocate`, so a node out of
memory is a clean refusal, never a SIGBUS on write) the first time an
extent needs them and kept for the server's life, so a later frame, batch
or client reuses them. Each worker maps a pool once and fills its own page
tables for what it writes into (`MADV_POPULATE_READ`), once per page: in
a shared writable mapping of memory no one writes back, a read fault maps a
page writable, without the write path's per-page dirtying (0.11 s a GiB of
taken pages against 0.27 s with MADV_POPULATE_WRITE on this VM; the writes
after either take no fault).

Holds: a client holds an extent with a read lock on its range through a
descriptor of its own (protocol.pool). A worker writes a frame into an
extent of its own under a write lock taken without waiting, so it never
writes where a client still holds; it writes into a batch buffer under a
read lock, shared with the client and the other workers filling it, which
keeps the buffer from going to another use meanwhile; and it tests for
holds (`held`) before giving a range to a new use. Each worker opens a
descriptor of its own for these locks: a lock of a worker that dies goes
with it.
"""
import ctypes
import errno
import fcntl
import logging
import mmap
import os
from typing import Optional, Tuple

import numpy as np

from psana_ipc.protocol.pool import (F_OFD_GETLK, F_OFD_SETLK, F_RDLCK, F_UNLCK, F_WRLCK,
                                     encode_ticket, lock_found, lock_request, ticket_offset)

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22     # Linux >= 5.14; the mmap module does not name it
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
FULL = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


class NoRoom(OSError):
    """The node has no memory (or the disk no room) for the pages asked for."""


class Held(Exception):
    """A client holds (part of) the range: it cannot be written or reused now."""


def round_up(nbytes: int) -> int:
    return max(PAGE, -(-nbytes // PAGE) * PAGE)


class PoolFile:
    """One pool: `size` bytes, the master's descriptor of it, and its id in replies."""

    def __init__(self, pool_id: int, size: int, directory: Optional[str] = None) -> None:
        self.id = pool_id
        self.size = round_up(size)
        self.on_disk = directory is not None
        if directory is None:
            self.fd = os.memfd_create("psana-ipc-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        else:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.size)

    def for_client(self) -> int:
        """A new descriptor of the pool for a client (through the door): one
        that can write in memory, where batch buffers are written in place by
        the client's code too, and no descriptor can change the size (sealed);
        read-only on disk, where only frames a client reads are."""
        mode = os.O_RDONLY if self.on_disk else os.O_RDWR
        return os.open(f"/proc/self/fd/{self.fd}", mode | os.O_CLOEXEC)

    def give_back(self) -> int:
        """At stop: free every page no client holds (a client's held frames and
        batches stay intact; what it reads elsewhere reads as zeros, never a
        fault). Returns the bytes given back."""
        freed, pos = 0, 0
        while pos < self.size:
            held = _first_held(self.fd, pos, self.size - pos)
            end = self.size if held is None else held[0]
            if end > pos:
                _punch(self.fd, pos, end - pos)
                freed += end - pos
            pos = self.size if held is None else held[0] + held[1]
        return freed

    def taken(self) -> int:
        """Bytes of the pool that have pages."""
        return os.fstat(self.fd).st_blocks * 512


def _first_held(fd: int, offset: int, size: int) -> Optional[Tuple[int, int]]:
    """(start, length) of the first lock anyone else holds in a range, or None."""
    found = lock_found(fcntl.fcntl(fd, F_OFD_GETLK, lock_request(F_WRLCK, offset, size)))
    if found is None:
        return None
    start, length = found
    return start, length or (offset + size - start)


def _punch(fd: int, offset: int, size: int) -> None:
    """Free a range's pages (fallocate's PUNCH_HOLE, which the os module does not
    offer: ctypes reaches the C library's own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size) != 0:
        log.warning("cannot give back %d bytes of the pool: %s", size,
                    os.strerror(ctypes.get_errno()))


class Mapping:
    """One worker's descriptor and mapping of a pool, made after the fork."""

    def __init__(self, pool: PoolFile) -> None:
        self.pool = pool
        self.fd = os.open(f"/proc/self/fd/{pool.fd}", os.O_RDWR | os.O_CLOEXEC)
        self.map = mmap.mmap(self.fd, pool.size)
        self.bytes = np.frombuffer(self.map, np.uint8)
        self._mapped = np.zeros(pool.size // PAGE, bool)    # page tables filled here

    def close(self) -> None:
        self.bytes = None
        try:
            self.map.close()
        except BufferError:
            pass        # a frame being sent still uses it; it goes with that view
        os.close(self.fd)

    # -- pages --------------------------------------------------------------------------
    def ready(self, offset: int, size: int) -> None:
        """Pages for a range, taken if nobody had, and mapped in this worker
        unless they were: NoRoom when the node has no memory for them."""
        lo, hi = offset // PAGE, -(-(offset + size) // PAGE)
        if self._mapped[lo:hi].all():
            return
        take(self.fd, lo * PAGE, (hi - lo) * PAGE)
        self._populate(lo, hi)

    def map_in(self, offset: int, size: int) -> None:
        """Fill this worker's page tables for a range whose pages some worker
        took, so a frame written there later does not fault each page in. Never
        for a range that may have holes: filling a hole takes a page past every
        room check."""
        lo, hi = offset // PAGE, -(-(offset + size) // PAGE)
        if not self._mapped[lo:hi].all():
            self._populate(lo, hi)

    def _populate(self, lo: int, hi: int) -> None:
        if not self.pool.on_disk:
            try:
                self.map.madvise(MADV_POPULATE_READ, lo * PAGE, (hi - lo) * PAGE)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOMEM, errno.EFAULT):
                    raise
        self._mapped[lo:hi] = True

    # -- holds ----------------------------------------------------------------------------
    def held(self, offset: int, size: int) -> bool:
        """Whether a client holds any part of the range."""
        return _first_held(self.fd, offset, size) is not None

    def locked(self, offset: int, size: int, exclusive: bool) -> "RangeLock":
        """Hold a range while writing into it: `exclusive`ly (a frame's own
        extent: Held if anyone holds any of it), or shared with its client and
        other workers (a batch buffer: Held only while the range is being
        given to another use)."""
        return RangeLock(self.fd, offset, size, F_WRLCK if exclusive else F_RDLCK)

    # -- bytes ----------------------------------------------------------------------------
    def array(self, offset: int, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable array at `offset` (in memory; see `staged` on disk)."""
        return np.ndarray(shape, dtype=dtype, buffer=self.map, offset=offset)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Read-only bytes at `offset`."""
        return memoryview(self.map)[offset:offset + nbytes].toreadonly()

    def write(self, offset: int, data: bytes) -> None:
        """Bytes written at `offset` (through the mapping, or to the file on disk,
        where a write through a mapping would first read every page)."""
        if self.pool.on_disk:
            os.pwrite(self.fd, data, offset)
        else:
            self.map[offset:offset + len(data)] = data

    def stamp(self, offset: int, size: int, ticket: int) -> None:
        """Write the extent's ticket at its end (protocol.pool)."""
        self.write(ticket_offset(offset, size), encode_ticket(ticket))


class RangeLock:
    """A lock on a range of a pool for a `with` block (a class, not a
    generator: it is taken for every frame written)."""

    __slots__ = ("fd", "offset", "size", "kind")

    def __init__(self, fd: int, offset: int, size: int, kind: int) -> None:
        self.fd, self.offset, self.size, self.kind = fd, offset, size, kind

    def __enter__(self) -> None:
        try:
            fcntl.fcntl(self.fd, F_OFD_SETLK, lock_request(self.kind, self.offset, self.size))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise Held(f"{self.size} bytes at {self.offset} are held") from None
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.fcntl(self.fd, F_OFD_SETLK, lock_request(F_UNLCK, self.offset, self.size))


def take(fd: int, offset: int, size: int) -> None:
    """Pages for a range (a no-op for pages taken before): a node out of room
    is a clean NoRoom here, never a SIGBUS when the frame is written."""
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as e:
        if e.errno in FULL:
            raise NoRoom(e.errno, f"no room for {size} bytes of frame memory") from e
        raise

