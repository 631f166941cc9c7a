"""The frame cache: frames a source produced, kept in shared memory for
every worker and every client of one server (`iserver --frame-cache SIZE`).

The cache's memory is a pool of large blocks, each a file named like slots
with the server's pid (`psipc_<server>_<server>_c<serial>`, in /dev/shm or
in the private directory of `--frame-cache-dir`), so a stop and
`psana-ipc cleanup` find them. An entry is an extent of a block: the frame's
bytes, then its descriptor (shape, dtype, timestamp...) as JSON. Every
worker and every client maps a block once and keeps the mapping, and an
evicted extent is reused for the next frame rather than given back: fresh
pages (allocated, zeroed and faulted in on both sides, which on a VM that
returns freed pages to its host costs more than the source's own work)
are paid once per byte of the cache, not once per frame. The source writes a
frame straight into its extent; clients map it read-only: a hit costs no
source call and no copy in the server.

The index is a table in an anonymous shared mapping the master makes
before forking, so every worker sees it; a row is an entry (the key's
128-bit digest, state, pins per worker, the policy's clocks, see
cache_policy.py) or a free extent. Rows are taken lowest first and reused,
and a lookup scans only the rows ever used (a few hundred for frames of
megabytes) with numpy, not the whole table sized for 64 KiB frames. Every change takes a POSIX record lock
(process_lock.py), never held across a source call or an allocation, which
the kernel drops when its holder dies: a SIGKILLed worker cannot wedge the
others. Within the lock a row's state is written last, and the master
frees the extents a dead worker was filling and drops its pins (its
connections died with it), so a row is never left half-made.

Bounds: blocks are made while their total stays within SIZE, and sparse: an
extent's pages are reserved (`posix_fallocate`) before the source writes
them, so a full file system means the frame is simply not cached, never a
SIGBUS. New pages are never taken when that would leave /dev/shm less free
room than the slots' budget (`keep_free`): on a node where others filled
/dev/shm, the frames that find no cache room still get slots. Once pages
are refused, the pool stops growing and the cache evicts to reuse what it
has, trying to grow again FULL_RETRY seconds later. Idle workers take the
pool's pages ahead of need (`warm`), up to SIZE. An entry handed to a client is pinned until released (or the
connection closes) and is never evicted while pinned.
"""
import argparse
import errno
import hashlib
import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.messages import Get
from psana_ipc.protocol.shm_names import SHM_DIR, segment_name
from psana_ipc.protocol.units import format_bytes

from .cache_policy import choose_victim
from .process_lock import ProcessLock
from .shm import PAGE, ShmFullError, round_up

log = logging.getLogger(__name__)
META_ROOM = 4096            # bytes after a frame for its descriptor
BLOCK_BYTES = 256 << 20     # a block of the pool (a frame larger than this gets its own)
WARM_BYTES = 8 << 20        # taken at a time by an idle worker (a request waits at most that)
FULL_RETRY = 10.0           # seconds the pool stays as it is after pages were refused
MADV_POPULATE_WRITE = 23    # Linux >= 5.14; the mmap module does not name it
FREE, FILLING, READY, SPACE = 0, 1, 2, 3     # SPACE: a free extent of a block
(KA, KB, STATE, SIZE, BLOCK, OFFSET, OWNER, LAST, INTERVAL, USES, FRAME_BYTES, META_LEN,
 PINS) = range(13)
_HEADER = ("tick", "serial", "held", "hits", "misses", "read_ahead", "evictions", "horizon",
           "blocks", "pool", "used", "full")
_H = {name: i for i, name in enumerate(_HEADER)}
Digest = Tuple[int, int]


class Pending:
    """Another worker is producing this frame now: look again shortly."""


PENDING = Pending()


@dataclass
class Entry:
    """A ready entry this worker pinned (or peeked at): where its bytes are
    (`path` is the block's file when it is not in /dev/shm)."""
    row: int
    block: int
    name: str
    offset: int
    frame_bytes: int
    meta_len: int
    path: Optional[str] = None


@dataclass
class Fill:
    """An extent this worker is writing a frame into: through its mapping of
    the block, or on disk through a buffer written out whole at commit (a
    write through a file mapping would read each page from disk first)."""
    row: int
    block: int
    offset: int
    size: int
    view: memoryview        # where the source writes
    staged: bool = False    # `view` is a buffer, to be written at `offset`

    @property
    def capacity(self) -> int:
        return self.size - META_ROOM

    def array(self, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable array at the start of the extent (the source's allocator)."""
        return np.ndarray(shape, dtype=dtype, buffer=self.view)


Found = Union[Entry, Pending, None]


def source_fingerprint(source: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                       options: argparse.Namespace) -> str:
    """The source's name and the values of its own command-line options: part
    of every key, so frames made with other settings never match."""
    own = argparse.ArgumentParser(add_help=False)
    add_arguments(own)
    values = {name: getattr(options, name, None) for name in vars(own.parse_args([]))}
    return json.dumps([source, values], sort_keys=True, default=str)


def check_room(limit: int, directory: str = SHM_DIR, keep_free: int = 0) -> Optional[str]:
    """Why a cache of `limit` bytes cannot be had in `directory`, if it cannot;
    a warning if it can have less, beside the `keep_free` bytes it leaves."""
    try:
        st = os.statvfs(directory)
    except OSError as e:
        return f"cannot look at {directory}: {e.strerror}"
    size = st.f_frsize * st.f_blocks
    if limit > size:
        return (f"--frame-cache {format_bytes(limit)} is more than {directory} holds "
                f"({format_bytes(size)})")
    if limit + keep_free > size:
        log.warning("--frame-cache %s and the %s it leaves free for slots (--shm-budget) "
                    "add up to more than %s holds (%s): the cache will hold at most %s",
                    format_bytes(limit), format_bytes(keep_free), directory,
                    format_bytes(size), format_bytes(size - keep_free))
    return None


def rows_for(limit: int) -> int:
    """Index rows for a cache of `limit` bytes: room for frames of 64 KiB."""
    return int(min(65536, max(256, limit // 65536)))


class FrameCache:
    """The shared index, made by the master; `worker(slot)` gives a worker's handle.
    Blocks are files in `directory` (/dev/shm unless --frame-cache-dir)."""

    def __init__(self, limit: int, workers: int, server_pid: int, fingerprint: str,
                 directory: str = SHM_DIR, keep_free: int = 0) -> None:
        self.limit = limit
        self.keep_free = keep_free
        self.workers = workers
        self.server_pid = server_pid
        self.fingerprint = fingerprint
        self.directory = directory
        self.on_disk = os.path.realpath(directory) != os.path.realpath(SHM_DIR)
        rows = rows_for(limit)
        cols = PINS + workers
        self._map = mmap.mmap(-1, (rows * cols + 3 * rows + len(_HEADER)) * 8)
        # column-major: a lookup scans the key columns, contiguous this way
        self.table = np.ndarray((rows, cols), np.int64, buffer=self._map, order="F")
        # per block: serial, size, bytes carved from its start
        self.blocks = np.ndarray((rows, 3), np.int64, buffer=self._map, offset=rows * cols * 8)
        self.header = np.ndarray((len(_HEADER),), np.int64, buffer=self._map,
                                 offset=(rows * cols + 3 * rows) * 8)
        self.locked = ProcessLock().held

    def rows(self) -> np.ndarray:
        """The index's rows ever used (the rest are free): every scan looks at
        these only, so a cache of large frames scans a few hundred rows, not
        the tens of thousands sized for small ones."""
        return self.table[:int(self.header[_H["used"]])]

    def name(self, block: int) -> str:
        return segment_name(self.server_pid, self.server_pid, f"c{int(self.blocks[block, 0]):x}")

    def path(self, block: int) -> str:
        return os.path.join(self.directory, self.name(block))

    def worker(self, slot: int) -> "WorkerCache":
        return WorkerCache(self, slot)

    # -- under the lock -------------------------------------------------------------------
    def give_back(self, row: int) -> None:
        """Under the lock: the entry's extent becomes free space, merged with
        the free extents beside it. Ordered so that dying half-way only loses
        space, never hands out the same bytes twice."""
        t = self.rows()
        block, offset, size = (int(t[row, c]) for c in (BLOCK, OFFSET, SIZE))
        self.header[_H["held"]] -= size
        space = (t[:, STATE] == SPACE) & (t[:, BLOCK] == block)
        right = np.flatnonzero(space & (t[:, OFFSET] == offset + size))
        left = np.flatnonzero(space & (t[:, OFFSET] + t[:, SIZE] == offset))
        if right.size:
            t[right[0], STATE] = FREE
            size += int(t[right[0], SIZE])
        if left.size:
            t[row, STATE] = FREE
            t[left[0], SIZE] += size
        else:
            t[row, SIZE] = size
            t[row, STATE] = SPACE

    def evict_one(self, read_ahead: bool) -> bool:
        """Under the lock: give up the entry the policy chooses; False if none may go."""
        t = self.rows()
        evictable = (t[:, STATE] == READY) & (t[:, PINS:].sum(axis=1) == 0)
        victim = choose_victim(evictable, t[:, LAST], t[:, INTERVAL], t[:, USES],
                               int(self.header[_H["tick"]]), int(self.header[_H["horizon"]]),
                               read_ahead)
        if victim is None:
            return False
        self.give_back(victim)
        self.header[_H["evictions"]] += 1
        return True

    def place(self, size: int, read_ahead: bool) -> Optional[int]:
        """Under the lock: a row describing an extent of `size` bytes, from
        free space, else carved anew while the pool is within its bound, else
        from what eviction frees; None if none can be had."""
        while True:
            row = self._fit(size)
            if row is None:
                row = self.carve(size)
            if row is not None:
                return row
            if not self.evict_one(read_ahead):
                return None

    def _free_row(self) -> Optional[int]:
        """A free row: one given up before, else the first never used."""
        rows = np.flatnonzero(self.rows()[:, STATE] == FREE)
        if rows.size:
            return int(rows[0])
        used = int(self.header[_H["used"]])
        if used == len(self.table):
            return None
        self.header[_H["used"]] = used + 1
        return used

    def _fit(self, size: int) -> Optional[int]:
        """The smallest free extent that holds `size`, split to it."""
        t = self.rows()
        fits = np.flatnonzero((t[:, STATE] == SPACE) & (t[:, SIZE] >= size))
        if not fits.size:
            return None
        row = int(fits[np.argmin(t[fits, SIZE])])
        t = self.table      # the spare row may be a new one, past those scanned
        rest = int(t[row, SIZE]) - size
        if rest:
            spare = self._free_row()
            if spare is None:
                return None
            t[spare, [BLOCK, OFFSET, SIZE]] = [t[row, BLOCK], t[row, OFFSET] + size, rest]
            t[spare, STATE] = SPACE
            t[row, SIZE] = size
        return row

    def carve(self, size: int) -> Optional[int]:
        """Under the lock: a row for `size` bytes never used before, from the
        end of the last block or from a new one; None when the bound or the
        index has no room. The pool counts every byte carved: the memory the
        cache may take."""
        h, b = self.header, int(self.header[_H["blocks"]]) - 1
        if (h[_H["full"]] > time.monotonic_ns() or int(h[_H["pool"]]) + size > self.limit
                or self._free_row() is None):
            return None
        if b < 0 or self.blocks[b, 1] - self.blocks[b, 2] < size:
            if b >= 0:
                self._close_block(b)
            b = self._new_block(size)
            if b is None:
                return None
        row = self._free_row()
        if row is None:
            return None
        self.table[row, [BLOCK, OFFSET, SIZE]] = [b, self.blocks[b, 2], size]
        self.blocks[b, 2] += size
        h[_H["pool"]] += size
        return row

    def _close_block(self, b: int) -> None:
        """Under the lock: nothing more is carved from the block; its tail, too
        short for the frame at hand, is left unused."""
        self.header[_H["pool"]] += self.blocks[b, 1] - self.blocks[b, 2]
        self.blocks[b, 2] = self.blocks[b, 1]

    def lose(self, row: int) -> None:
        """Under the lock: an extent whose pages could not be had (a full file
        system) is not offered again, and the pool stops growing for a while
        (`refused`). Carved last from its block, it goes back to the
        block's end; else it is dropped, and the pool still counts it."""
        t, b = self.table, int(self.table[row, BLOCK])
        size, end = int(t[row, SIZE]), int(t[row, OFFSET] + t[row, SIZE])
        self.refused()
        self.header[_H["held"]] -= size
        t[row, STATE] = FREE
        if self.blocks[b, 2] == end:
            self.blocks[b, 2] -= size
            self.header[_H["pool"]] -= size

    def refused(self) -> None:
        """Under the lock: the file system refused pages; for FULL_RETRY
        seconds the pool takes no more and room comes from eviction."""
        now = time.monotonic_ns()
        if self.header[_H["full"]] <= now:
            log.warning("%s has no room for more frame cache: it keeps the %d MB it has "
                        "(pool %d MB)", self.directory, int(self.header[_H["held"]]) >> 20,
                        int(self.header[_H["pool"]]) >> 20)
        self.header[_H["full"]] = now + int(FULL_RETRY * 1e9)

    def _new_block(self, size: int) -> Optional[int]:
        """Under the lock: a new block, a sparse file of BLOCK_BYTES (or what
        the bound has left, or `size` if more); its pages are taken extent
        by extent. None if no file could be made."""
        h = self.header
        block = int(h[_H["blocks"]])
        room = self.limit - int(h[_H["pool"]])
        nbytes = max(size, min(BLOCK_BYTES, room) // PAGE * PAGE)
        if block >= len(self.blocks) or nbytes > room:
            return None
        for _ in range(16):         # a name someone else planted is passed over
            h[_H["serial"]] += 1
            self.blocks[block] = [h[_H["serial"]], nbytes, 0]
            try:
                fd = os.open(self.path(block), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                continue
        else:
            return None
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        h[_H["blocks"]] += 1
        return block

    # -- the master's side ----------------------------------------------------------------
    def worker_died(self, slot: int) -> None:
        """Drop a dead worker's pins and free the extents it was writing."""
        with self.locked():
            t = self.rows()
            t[:, PINS + slot] = 0
            for row in np.flatnonzero((t[:, STATE] == FILLING) & (t[:, OWNER] == slot)):
                self.give_back(int(row))

    def stats(self) -> Dict[str, int]:
        t = self.rows()
        ready = t[:, STATE] == READY
        h = {name: int(self.header[i]) for name, i in _H.items()}
        return {"limit": self.limit, "bytes_held": h["held"], "pool_bytes": h["pool"],
                "entries": int(ready.sum()),
                "pinned": int((ready & (t[:, PINS:].sum(axis=1) > 0)).sum()),
                "hits": h["hits"], "misses": h["misses"], "read_ahead": h["read_ahead"],
                "evictions": h["evictions"]}


class WorkerCache:
    """One worker's use of the shared cache: find, pin, fill and release entries."""

    def __init__(self, cache: FrameCache, slot: int) -> None:
        self.cache = cache
        self.slot = slot
        self.table = cache.table
        self.header = cache.header
        self._maps: Dict[int, Tuple[int, mmap.mmap]] = {}   # block -> (fd, mapping), kept
        self._pages: Dict[int, np.ndarray] = {}  # block -> which of its pages are mapped here
        self._ahead: Dict[int, int] = {}        # block -> where `_map_ahead` goes on

    def _block(self, block: int) -> Tuple[int, mmap.mmap]:
        """This worker's descriptor and mapping of a block, made once: a
        mapping made afresh for every frame faults every page in again."""
        kept = self._maps.get(block)
        if kept is None:
            fd = os.open(self.cache.path(block), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            size = int(self.cache.blocks[block, 1])
            kept = self._maps[block] = (fd, mmap.mmap(fd, size))
            self._pages[block] = np.zeros(size // PAGE, bool)
        return kept

    def frame(self, entry: Entry) -> memoryview:
        """The entry's frame bytes, read-only; read only while it is pinned."""
        m = self._block(entry.block)[1]
        return memoryview(m)[entry.offset:entry.offset + entry.frame_bytes].toreadonly()

    def fields(self, entry: Entry) -> Dict[str, Any]:
        """The frame's descriptor, as stored after its bytes."""
        start = entry.offset + entry.frame_bytes
        return json.loads(self._block(entry.block)[1][start:start + entry.meta_len])

    def key(self, get: Get, event: int) -> Digest:
        """Source options + exp + run + detector + access mode + mode + event."""
        text = json.dumps([self.cache.fingerprint, get.key.exp, get.key.run, get.key.detector,
                           get.key.access_mode, get.mode, event])
        a, b = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), "<i8")
        return int(a), int(b)

    def _row(self, key: Digest) -> Optional[int]:
        t = self.cache.rows()
        live = (t[:, STATE] == FILLING) | (t[:, STATE] == READY)
        rows = np.flatnonzero((t[:, KA] == key[0]) & (t[:, KB] == key[1]) & live)
        return int(rows[0]) if rows.size else None

    def _entry(self, row: int) -> Entry:
        t = self.table
        block = int(t[row, BLOCK])
        return Entry(row, block, self.cache.name(block), int(t[row, OFFSET]),
                     int(t[row, FRAME_BYTES]), int(t[row, META_LEN]),
                     self.cache.path(block) if self.cache.on_disk else None)

    def _found(self, row: int, pin: bool) -> Found:
        """Under the lock: the answer for an existing row, counted as a client read if pinned."""
        t, h = self.table, self.header
        if t[row, STATE] == FILLING:
            return PENDING
        if pin:
            t[row, PINS + self.slot] += 1
            h[_H["tick"]] += 1
            h[_H["hits"]] += 1
            now = h[_H["tick"]]
            if t[row, USES] >= 1:
                t[row, INTERVAL] = now - t[row, LAST]
                h[_H["horizon"]] = max(h[_H["horizon"]], t[row, INTERVAL])
            t[row, USES] += 1
            t[row, LAST] = now
        return self._entry(row)

    def lookup(self, key: Digest, pin: bool = True) -> Found:
        """The entry if cached (pinned for a client read when `pin`), PENDING
        while another worker writes it, None if absent."""
        with self.cache.locked():
            row = self._row(key)
            return None if row is None else self._found(row, pin)

    def claim(self, key: Digest, nbytes: int, read_ahead: bool = False) -> Union[Fill, Found]:
        """Reserve an extent of `nbytes` for this worker to write, evicting what
        the policy gives up; None when there is no room (the frame is then
        served without the cache). Someone else's entry for the key, if it
        appeared meanwhile, is answered as `lookup` would. A client's claim
        that is not answered so is a miss."""
        size = round_up(nbytes + META_ROOM)
        t, h = self.table, self.header
        with self.cache.locked():
            row = self._row(key)
            if row is not None:
                return self._found(row, pin=not read_ahead)
            if not read_ahead:
                h[_H["misses"]] += 1
            row = self.cache.place(size, read_ahead) if size <= self.cache.limit else None
            if row is None:
                return None
            t[row, [KA, KB, OWNER, USES, INTERVAL]] = [key[0], key[1], self.slot, 0, 0]
            t[row, PINS:] = 0
            h[_H["held"]] += size
            t[row, STATE] = FILLING
            block, offset = int(t[row, BLOCK]), int(t[row, OFFSET])
        if not self._ready(row, block, offset, size):
            return None
        if self.cache.on_disk:
            return Fill(row, block, offset, size, memoryview(bytearray(size)), staged=True)
        m = self._block(block)[1]
        return Fill(row, block, offset, size, memoryview(m)[offset:offset + size])

    def _ready(self, row: int, block: int, offset: int, size: int) -> bool:
        """Pages for an extent this worker holds, taken (if nobody had) and
        mapped here unless this worker mapped them before; False (the extent
        dropped) when the file system is full."""
        fd, m = self._block(block)
        pages = self._pages[block][offset // PAGE:(offset + size) // PAGE]
        try:
            if not pages.all():
                _allocate(fd, offset, size, self.cache.keep_free)
                if not self.cache.on_disk:
                    _populate(m, offset, size)
        except ShmFullError:
            with self.cache.locked():
                self.cache.lose(row)
            return False
        pages[:] = True
        return True

    def warm(self) -> bool:
        """Idle work: take WARM_BYTES more of the pool's memory now, so that a
        frame cached later does not wait for fresh pages; once the pool has
        all it may hold, map WARM_BYTES more of it in this worker, so that a
        frame written here does not fault in the pages another worker took.
        False when there is nothing left to do (or no room left to do it)."""
        if self.cache.on_disk:
            return False            # the page cache is the kernel's to manage there
        h = self.header
        with self.cache.locked():
            size = min(WARM_BYTES, (self.cache.limit - int(h[_H["pool"]])) // PAGE * PAGE)
            row = self.cache.carve(size) if size else None
            if row is None:
                return self._map_ahead()
            block, offset = int(self.table[row, BLOCK]), int(self.table[row, OFFSET])
            h[_H["held"]] += size
            self.cache.give_back(row)    # free space at once: a claim never waits for it
        fd, m = self._block(block)
        try:
            _allocate(fd, offset, size, self.cache.keep_free)
            _populate(m, offset, size)
        except ShmFullError:
            with self.cache.locked():
                self.cache.refused()
            return False        # the file system is full: frames take what is left
        self._pages[block][offset // PAGE:(offset + size) // PAGE] = True
        return True

    def _map_ahead(self) -> bool:
        """The next WARM_BYTES of the pool mapped in this worker, where pages
        exist: a hole (an extent whose pages were refused, or not taken yet)
        is left to `_ready`, which reserves pages before anything is written;
        populating it here would take pages past the bound and the room kept
        free. False once the whole pool carved so far was looked at."""
        for block in range(int(self.header[_H["blocks"]])):
            fd, m = self._block(block)
            start = self._ahead.get(block, 0)
            end = min(int(self.cache.blocks[block, 2]), start + WARM_BYTES)
            if start >= end:
                continue
            for lo, hi in _data(fd, start, end):
                try:
                    _populate(m, lo, hi - lo)
                except ShmFullError:
                    continue
                self._pages[block][lo // PAGE:-(-hi // PAGE)] = True
            self._ahead[block] = end
            return True
        return False

    def commit(self, fill: Fill, fields: Dict[str, Any], frame_bytes: int,
               pin: bool) -> Optional[Entry]:
        """The frame is written: store its descriptor after it and make the
        entry visible, pinned for a client read (`pin`), else counted as read
        ahead. None if the descriptor does not fit its room (or the disk
        refuses the write): the caller copies the frame out, then abandons
        the extent."""
        meta = json.dumps(fields).encode()
        if frame_bytes + len(meta) > fill.size:
            return None
        fill.view[frame_bytes:frame_bytes + len(meta)] = meta
        if fill.staged:
            try:
                os.pwrite(self._block(fill.block)[0], fill.view[:frame_bytes + len(meta)],
                          fill.offset)
            except OSError as e:
                log.warning("cannot write a frame to the cache on disk: %s", e.strerror)
                return None
        t, h = self.table, self.header
        with self.cache.locked():
            h[_H["tick"]] += 1
            t[fill.row, [LAST, USES, FRAME_BYTES, META_LEN]] = [h[_H["tick"]], int(pin),
                                                                  frame_bytes, len(meta)]
            if pin:
                t[fill.row, PINS + self.slot] += 1
            else:
                h[_H["read_ahead"]] += 1
            t[fill.row, STATE] = READY
            return self._entry(fill.row)

    def abandon(self, fill: Fill) -> None:
        """The frame could not be written (or kept): free its extent."""
        with self.cache.locked():
            self.cache.give_back(fill.row)

    def unpin(self, entry: Entry) -> None:
        with self.cache.locked():
            self.table[entry.row, PINS + self.slot] -= 1


def _allocate(fd: int, offset: int, size: int, keep_free: int) -> None:
    """Pages for an extent (a no-op for pages taken before): a full file
    system, or one that would keep less than `keep_free` bytes free, is a
    clean ShmFullError here, never a SIGBUS when the source writes."""
    if keep_free and os.lseek(fd, offset, os.SEEK_HOLE) < offset + size:
        st = os.fstatvfs(fd)
        if st.f_bavail * st.f_frsize < keep_free + size:
            raise ShmFullError(errno.ENOSPC, f"no room for {size} bytes of frame cache "
                                             f"beside {keep_free} bytes kept free for slots")
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise ShmFullError(e.errno, f"no room for {size} bytes of frame cache") from e
        raise


def _data(fd: int, start: int, end: int) -> Iterator[Tuple[int, int]]:
    """The ranges of [start, end) of a file that have pages (not holes)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data past pos
                return
            raise
        if data >= end:
            return
        pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, pos


def _populate(m: mmap.mmap, offset: int, size: int) -> None:
    """Map an extent's pages into this process's page tables in one go,
    zeroing fresh ones, without changing what they hold: not faulted in one
    by one as the source writes. A kernel without MADV_POPULATE_WRITE
    (before 5.14) leaves that to the faults."""
    try:
        m.madvise(MADV_POPULATE_WRITE, offset, size)
    except OSError as e:
        if e.errno in (errno.ENOMEM, errno.EFAULT):
            raise ShmFullError(e.errno, f"no room for {size} bytes of frame cache") from e
