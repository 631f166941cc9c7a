"""The frame cache: frames a source produced, kept in the pool for every
worker and every client of one server (`iserver --frame-cache SIZE`).

An entry is an extent of a pool (the pool in memory, or with
`--frame-cache-dir` the pool on disk): the frame's bytes, then its
descriptor (shape, dtype, timestamp...) as JSON, its ticket at the end. Its
row in the index (pool_index.py) holds the key's 128-bit digest, the
policy's clocks (cache_policy.py) and the pins of the requests using it.
The source writes a frame straight into its entry (on disk into a buffer
written out whole at commit: a write through a file mapping would read
every page first); clients hold an entry as they hold any extent, so an
entry a client still reads is never given up, even after the worker that
pinned it for that client died. Entries stay within SIZE: a new one evicts
what the policy gives up first.
"""
import argparse
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.messages import Get
from psana_ipc.protocol.pool import TICKET_BYTES

from .frame_memory import Extent, FrameMemory, new_ticket
from .pool_allocator import evict_one, place
from .pool_index import CACHED, FILLING
from .pool_pages import Held, round_up

META_ROOM = 4096            # bytes after a frame for its descriptor and its ticket
Digest = Tuple[int, int]


class Pending:
    """Another worker is producing this frame now: look again shortly."""


PENDING = Pending()


@dataclass(frozen=True)
class Entry(Extent):
    """A ready entry this worker pinned (or peeked at)."""
    frame_bytes: int = 0
    meta_len: int = 0


@dataclass
class Fill:
    """An entry this worker is writing a frame into."""
    extent: Extent
    staged: Optional[np.ndarray] = None     # on disk: the buffer written at commit

    @property
    def capacity(self) -> int:
        return self.extent.size - META_ROOM


Found = Union[Entry, Pending, None]


def source_fingerprint(source: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                       options: argparse.Namespace) -> str:
    """The source's name and the values of its own command-line options: part
    of every key, so frames made with other settings never match."""
    own = argparse.ArgumentParser(add_help=False)
    add_arguments(own)
    values = {name: getattr(options, name, None) for name in vars(own.parse_args([]))}
    return json.dumps([source, values], sort_keys=True, default=str)


class FrameCache:
    """One worker's use of the shared cache: find, pin, fill and release entries."""

    def __init__(self, memory: FrameMemory, fingerprint: str, pool: int) -> None:
        self.memory = memory
        self.index = memory.index
        self.fingerprint = fingerprint
        self.pool = pool

    @property
    def on_disk(self) -> bool:
        return self.memory.pools[self.pool].on_disk

    def key(self, get: Get, event: int) -> Digest:
        """Source options + exp + run + detector + access mode + mode + event."""
        text = json.dumps([self.fingerprint, get.key.exp, get.key.run, get.key.detector,
                           get.key.access_mode, get.mode, event])
        a, b = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), "<i8")
        return int(a), int(b)

    # -- reading ----------------------------------------------------------------------------
    def frame(self, entry: Entry) -> memoryview:
        """The entry's frame bytes, read-only; read only while it is pinned."""
        return self.memory.maps[entry.pool].view(entry.offset, entry.frame_bytes)

    def fields(self, entry: Entry) -> Dict[str, Any]:
        """The frame's descriptor, as stored after its bytes."""
        meta = self.memory.maps[entry.pool].view(entry.offset + entry.frame_bytes, entry.meta_len)
        return json.loads(bytes(meta))

    def _row(self, key: Digest) -> Optional[int]:
        rows = self.index.rows_where((FILLING, CACHED), key_a=key[0], key_b=key[1])
        return int(rows[0]) if rows.size else None

    def _entry(self, row: int) -> Entry:
        ix = self.index
        return Entry(row, int(ix.pool[row]), int(ix.offset[row]), int(ix.size[row]),
                     int(ix.ticket[row]), int(ix.frame_bytes[row]), int(ix.meta_len[row]))

    def _found(self, row: int, pin: bool) -> Found:
        """Under the lock: the answer for an existing row, counted as a client read if pinned."""
        ix = self.index
        if ix.state[row] == FILLING:
            return PENDING
        if pin:
            ix.pins[row, self.memory.slot] += 1
            ix.count("hits")
            now = ix.count("tick")
            if ix.uses[row] >= 1:
                ix.interval[row] = now - ix.last[row]
                horizon = ix.get("horizon")
                ix.count("horizon", max(0, int(ix.interval[row]) - horizon))
            ix.uses[row] += 1
            ix.last[row] = now
        return self._entry(row)

    def lookup(self, key: Digest, pin: bool = True) -> Found:
        """The entry if cached (pinned for a client read when `pin`), PENDING
        while another worker writes it, None if absent."""
        with self.memory.locked():
            row = self._row(key)
            return None if row is None else self._found(row, pin)

    # -- filling ----------------------------------------------------------------------------
    def claim(self, key: Digest, nbytes: int, read_ahead: bool = False) -> Union[Fill, Found]:
        """Reserve an entry of `nbytes` for this worker to write, evicting what
        the policy gives up; None when there is no room (the frame is then
        served without the cache). Someone else's entry for the key, if it
        appeared meanwhile, is answered as `lookup` would. A client's claim
        that is not answered so is a miss."""
        size = round_up(nbytes + META_ROOM)
        ix, memory = self.index, self.memory
        with memory.locked():
            row = self._row(key)
            if row is not None:
                return self._found(row, pin=not read_ahead)
            if not read_ahead:
                ix.count("misses")
            offset = self._room(size, read_ahead)
            if offset is None:
                return None
            row = ix.put(FILLING, pool=self.pool, offset=offset, size=size, key_a=key[0],
                         key_b=key[1], ticket=new_ticket(), owner=memory.slot,
                         gen=memory.generation)
            if row is None:
                return None
            extent = Extent(row, self.pool, offset, size, int(ix.ticket[row]))
        try:
            memory.ready(extent)
        except ProtocolError:
            return None         # no pages for it: served without the cache (ready gave it back)
        return Fill(extent, np.empty(size, np.uint8) if self.on_disk else None)

    def _room(self, size: int, read_ahead: bool) -> Optional[int]:
        """Under the lock: an offset for a new entry, within the cache's bound."""
        ix, pool = self.index, self.memory.pools[self.pool]
        if size > ix.cache_limit:
            return None
        while ix.cache_bytes() + size > ix.cache_limit:
            if not evict_one(ix, self.pool, self.memory.held, read_ahead):
                return None
        return place(ix, self.pool, pool.size, size, self.memory.held, read_ahead=read_ahead)

    @contextmanager
    def writing(self, fill: Fill) -> Iterator[Callable[[Tuple[int, ...], np.dtype], np.ndarray]]:
        """Where the source writes the frame (the allocator it is given), under
        the entry's exclusive lock; Held if a client of an earlier use of the
        memory still reads there (the fill is then abandoned)."""
        def array(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            if fill.staged is not None:
                return np.ndarray(shape, dtype, buffer=fill.staged)
            return self.memory.maps[fill.extent.pool].array(fill.extent.offset, shape, dtype)
        try:
            with self.memory.writing(fill.extent):
                yield array
        except Held:
            self.memory.orphan(fill.extent)
            raise

    def commit(self, fill: Fill, fields: Dict[str, Any], frame_bytes: int,
               pin: bool) -> Optional[Entry]:
        """The frame is written: store its descriptor after it and make the
        entry visible, pinned for a client read (`pin`), else counted as read
        ahead. None if the descriptor does not fit its room (or the disk
        refuses the write): the caller copies the frame out, then abandons
        the extent."""
        meta = json.dumps(fields).encode()
        if frame_bytes + len(meta) > fill.extent.size - TICKET_BYTES:
            return None
        extent, mapping = fill.extent, self.memory.maps[fill.extent.pool]
        try:
            if fill.staged is not None:
                mapping.write(extent.offset, fill.staged[:frame_bytes].tobytes() + meta)
            else:
                mapping.write(extent.offset + frame_bytes, meta)
            mapping.stamp(extent.offset, extent.size, extent.ticket)
        except OSError:
            return None
        ix = self.index
        with self.memory.locked():
            if ix.state[extent.row] != FILLING or ix.ticket[extent.row] != extent.ticket:
                return None
            ix.last[extent.row] = ix.count("tick")
            ix.uses[extent.row] = int(pin)
            ix.frame_bytes[extent.row], ix.meta_len[extent.row] = frame_bytes, len(meta)
            if pin:
                ix.pins[extent.row, self.memory.slot] += 1
            else:
                ix.count("read_ahead")
            ix.owner[extent.row] = -1
            ix.state[extent.row] = CACHED
            return self._entry(extent.row)

    def abandon(self, fill: Fill) -> None:
        """The frame could not be written (or kept): free its extent."""
        self.memory.give(fill.extent, state=FILLING)

    def unpin(self, entry: Entry) -> None:
        with self.memory.locked():
            ix = self.index
            if ix.state[entry.row] == CACHED and ix.ticket[entry.row] == entry.ticket \
                    and ix.pins[entry.row, self.memory.slot] > 0:
                ix.pins[entry.row, self.memory.slot] -= 1

    # -- what stats show ----------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        ix = self.index
        rows = ix.rows_where((CACHED,))
        counters = {name: ix.get(name) for name in ("hits", "misses", "read_ahead", "evictions")}
        return dict(counters, limit=ix.cache_limit, bytes_held=ix.cache_bytes(),
                    pool_bytes=self.memory.pools[self.pool].taken(),
                    ready_workers=ix.get("warm_mapped"), entries=int(rows.size),
                    pinned=int((ix.pins[rows].sum(axis=1) > 0).sum()))

