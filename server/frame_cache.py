"""The frame cache: frames a source produced, kept in shared memory for
every worker and every client of one server (`iserver --frame-cache SIZE`).

Each cached frame is a segment of its own in /dev/shm, named like slots
with the server's pid (`psipc_<server>_<server>_c<serial>`), so a stop, a
dead worker's clean-up and `psana-ipc cleanup` find it. The frame is
written once, straight from the source, and clients map it read-only: a
hit costs no source call and no copy in the server. The frame's descriptor
(shape, dtype, timestamp...) is stored as JSON right after its bytes.

The index is a table in an anonymous shared mapping the master makes
before forking, so every worker sees it; a row per entry holds the key's
128-bit digest, state, size, pins per worker and the policy's clocks
(cache_policy.py). Every change to it takes a POSIX record lock
(process_lock.py), which the kernel drops when its holder dies: a SIGKILLed
worker cannot wedge the others. Within the lock a row's state is written last, and the master
frees the rows a dead worker was filling and drops its pins (its
connections died with it), so a row is never left half-made.

Memory follows the slots' lifecycle: an entry's bytes are reserved (within
the cache's own bound) before the source is called; an entry handed to a
client is pinned until released (or the connection closes) and is never
evicted while pinned; eviction truncates, then unlinks, so tmpfs frees the
pages at once. A full /dev/shm means the frame is simply not cached.
"""
import argparse
import hashlib
import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.messages import Get
from psana_ipc.protocol.shm_names import SHM_DIR, segment_name, segment_path

from .cache_policy import choose_victim
from .process_lock import ProcessLock
from .shm import Segment, ShmFullError, round_up, truncate, unlink

META_ROOM = 4096            # bytes after a frame for its descriptor
FREE, FILLING, READY = 0, 1, 2
(KA, KB, STATE, SIZE, SERIAL, OWNER, LAST, INTERVAL, USES, FRAME_BYTES, META_LEN,
 PINS) = range(12)
_HEADER = ("tick", "serial", "held", "hits", "misses", "read_ahead", "evictions", "horizon")
_H = {name: i for i, name in enumerate(_HEADER)}
Digest = Tuple[int, int]


class Pending:
    """Another worker is producing this frame now: look again shortly."""


PENDING = Pending()


@dataclass
class Entry:
    """A ready entry this worker pinned (or peeked at)."""
    row: int
    name: str
    frame_bytes: int
    meta_len: int

    def fields(self) -> Dict[str, Any]:
        """The frame's descriptor, as stored after its bytes."""
        fd = os.open(segment_path(self.name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return json.loads(os.pread(fd, self.meta_len, self.frame_bytes))
        finally:
            os.close(fd)


@dataclass
class Fill:
    """An entry this worker is writing: its row and its segment."""
    row: int
    segment: Segment

    @property
    def capacity(self) -> int:
        return self.segment.size - META_ROOM


Found = Union[Entry, Pending, None]


def source_fingerprint(source: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                       options: argparse.Namespace) -> str:
    """The source's name and the values of its own command-line options: part
    of every key, so frames made with other settings never match."""
    own = argparse.ArgumentParser(add_help=False)
    add_arguments(own)
    values = {name: getattr(options, name, None) for name in vars(own.parse_args([]))}
    return json.dumps([source, values], sort_keys=True, default=str)


def check_room(limit: int) -> Optional[str]:
    """Why a cache of `limit` bytes cannot be had on this node, if it cannot."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as e:
        return f"cannot look at {SHM_DIR}: {e.strerror}"
    size = st.f_frsize * st.f_blocks
    if limit > size:
        return f"--frame-cache {limit} bytes is more than {SHM_DIR} holds ({size} bytes)"
    return None


def rows_for(limit: int) -> int:
    """Index rows for a cache of `limit` bytes: room for frames of 64 KiB."""
    return int(min(65536, max(256, limit // 65536)))


class FrameCache:
    """The shared index, made by the master; `worker(slot)` gives a worker's handle."""

    def __init__(self, limit: int, workers: int, server_pid: int, fingerprint: str) -> None:
        self.limit = limit
        self.workers = workers
        self.server_pid = server_pid
        self.fingerprint = fingerprint
        rows = rows_for(limit)
        cols = PINS + workers
        self._map = mmap.mmap(-1, (rows * cols + len(_HEADER)) * 8)
        # column-major: a lookup scans the key columns, contiguous this way
        self.table = np.ndarray((rows, cols), np.int64, buffer=self._map, order="F")
        self.header = np.ndarray((len(_HEADER),), np.int64, buffer=self._map,
                                 offset=rows * cols * 8)
        self.locked = ProcessLock().held

    def name(self, serial: int) -> str:
        return segment_name(self.server_pid, self.server_pid, f"c{serial:x}")

    def worker(self, slot: int) -> "WorkerCache":
        return WorkerCache(self, slot)

    # -- under the lock -------------------------------------------------------------------
    def free(self, row: int) -> None:
        """Under the lock: truncate, unlink, and forget an entry."""
        name = self.name(int(self.table[row, SERIAL]))
        truncate(name)
        unlink(name)
        self.header[_H["held"]] -= self.table[row, SIZE]
        self.table[row, STATE] = FREE

    def evict_one(self, read_ahead: bool) -> bool:
        """Under the lock: give up the entry the policy chooses; False if none may go."""
        t = self.table
        evictable = (t[:, STATE] == READY) & (t[:, PINS:].sum(axis=1) == 0)
        victim = choose_victim(evictable, t[:, LAST], t[:, INTERVAL], t[:, USES],
                               int(self.header[_H["tick"]]), int(self.header[_H["horizon"]]),
                               read_ahead)
        if victim is None:
            return False
        self.free(victim)
        self.header[_H["evictions"]] += 1
        return True

    # -- the master's side ----------------------------------------------------------------
    def worker_died(self, slot: int) -> None:
        """Drop a dead worker's pins and the entries it was writing."""
        with self.locked():
            self.table[:, PINS + slot] = 0
            t = self.table
            for row in np.flatnonzero((t[:, STATE] == FILLING) & (t[:, OWNER] == slot)):
                self.free(int(row))

    def stats(self) -> Dict[str, int]:
        t = self.table
        ready = t[:, STATE] == READY
        h = {name: int(self.header[i]) for name, i in _H.items()}
        return {"limit": self.limit, "bytes_held": h["held"], "entries": int(ready.sum()),
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
        self._maps: "OrderedDict[str, mmap.mmap]" = OrderedDict()

    def frame(self, entry: Entry) -> memoryview:
        """The entry's frame bytes, read-only, through a mapping this worker keeps:
        mapping an entry afresh on every hit faults its pages in again, which costs
        as much as copying the frame. Read only while the entry is pinned (an
        evicted entry is truncated); at most one mapping per index row is kept."""
        if not entry.frame_bytes:
            return memoryview(b"")
        kept = self._maps.pop(entry.name, None)
        if kept is None:
            fd = os.open(segment_path(entry.name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                kept = mmap.mmap(fd, entry.frame_bytes, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        self._maps[entry.name] = kept
        while len(self._maps) > len(self.table):
            _close(self._maps.popitem(last=False)[1])
        return memoryview(kept)

    def key(self, get: Get, event: int) -> Digest:
        """Source options + exp + run + detector + access mode + mode + event."""
        text = json.dumps([self.cache.fingerprint, get.key.exp, get.key.run, get.key.detector,
                           get.key.access_mode, get.mode, event])
        a, b = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), "<i8")
        return int(a), int(b)

    def _row(self, key: Digest) -> Optional[int]:
        t = self.table
        rows = np.flatnonzero((t[:, KA] == key[0]) & (t[:, KB] == key[1]) & (t[:, STATE] != FREE))
        return int(rows[0]) if rows.size else None

    def _entry(self, row: int) -> Entry:
        t = self.table
        return Entry(row, self.cache.name(int(t[row, SERIAL])), int(t[row, FRAME_BYTES]),
                     int(t[row, META_LEN]))

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
        """Reserve an entry of `nbytes` for this worker to write, evicting what
        the policy gives up; None when there is no room (the frame is then
        served without the cache). Someone else's entry for the key, if it
        appeared meanwhile, is answered as `lookup` would. A client's claim
        that is not answered so is a miss."""
        size = round_up(nbytes + META_ROOM)
        with self.cache.locked():
            row = self._row(key)
            if row is not None:
                return self._found(row, pin=not read_ahead)
            t, h = self.table, self.header
            if not read_ahead:
                h[_H["misses"]] += 1
            if size > self.cache.limit:
                return None
            while h[_H["held"]] + size > self.cache.limit or not (t[:, STATE] == FREE).any():
                if not self.cache.evict_one(read_ahead):
                    return None
            row = int(np.flatnonzero(t[:, STATE] == FREE)[0])
            t[row, [KA, KB, SIZE, OWNER, USES, INTERVAL]] = [key[0], key[1], size, self.slot, 0, 0]
            t[row, PINS:] = 0
            h[_H["held"]] += size
            t[row, STATE] = FILLING
        try:
            return Fill(row, Segment(lambda: self._new_name(row), size))
        except (ShmFullError, FileExistsError):
            with self.cache.locked():
                self.header[_H["held"]] -= size
                t[row, STATE] = FREE
            return None

    def _new_name(self, row: int) -> str:
        with self.cache.locked():
            self.header[_H["serial"]] += 1
            self.table[row, SERIAL] = self.header[_H["serial"]]
            return self.cache.name(int(self.table[row, SERIAL]))

    def commit(self, fill: Fill, fields: Dict[str, Any], frame_bytes: int, pin: bool) -> Entry:
        """The frame is written: store its descriptor after it and make the
        entry visible, pinned for a client read (`pin`), else counted as read
        ahead. A descriptor longer than META_ROOM grows the segment (and the
        bytes held) by what it needs."""
        meta = json.dumps(fields).encode()
        fill.segment.close()
        fd = os.open(segment_path(fill.segment.name), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, meta, frame_bytes)
        finally:
            os.close(fd)
        grown = max(0, round_up(frame_bytes + len(meta)) - fill.segment.size)
        t, h = self.table, self.header
        with self.cache.locked():
            h[_H["tick"]] += 1
            h[_H["held"]] += grown
            t[fill.row, [SIZE, LAST, USES, FRAME_BYTES, META_LEN]] = [
                fill.segment.size + grown, h[_H["tick"]], int(pin), frame_bytes, len(meta)]
            if pin:
                t[fill.row, PINS + self.slot] += 1
            else:
                h[_H["read_ahead"]] += 1
            t[fill.row, STATE] = READY
            return self._entry(fill.row)

    def abandon(self, fill: Fill) -> None:
        """The frame could not be written: free its entry."""
        fill.segment.close()
        with self.cache.locked():
            self.cache.free(fill.row)

    def unpin(self, entry: Entry) -> None:
        with self.cache.locked():
            self.table[entry.row, PINS + self.slot] -= 1


def _close(kept: mmap.mmap) -> None:
    try:
        kept.close()
    except BufferError:
        pass    # an inline reply still sends from it; the mapping goes with that view
