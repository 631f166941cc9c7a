"""Batch arenas: one shared-memory segment per in-flight batch of a client,
which the workers serving its connection group write every frame into, in
place, so the client wraps the whole batch without a copy.

A connection group is named by an id the server issues in the hello reply
(`issue_group`) and checks when another connection of the group presents
it (`group_is_ours`): both are an HMAC under a key the master makes at
import, before it forks, so every worker (also one respawned later) can
check an id without shared state. An arena's segment name carries a tag
derived from its group id under the same key, so a worker writes only into
arenas of its own server made for its connection's group, and a group id
read off a name in /dev/shm gives nothing. Every offset is checked against
the arena's size and the frame's dtype, and the frame's shape and dtype
against what the request laid out, before a byte is written.

An arena is reserved from the budget like a slot (the connection's
`Holding`), named like a slot (so every stop path and `psana-ipc cleanup`
remove it) and lives until its connection closes, unless another
connection of the group adopts it first (`adopt`: the arena a DataLoader
worker made outlives the worker in the process that keeps the batches; it
takes a name of the adopting worker's, and the maker's unlink of the old
name finds nothing). It is then only
unlinked, never truncated: another worker of the group may be writing into
it at that moment, and a truncated mapping would kill that worker with
SIGBUS. The pages go when the last mapping does: every worker drops its
mappings of unlinked arenas when one of its connections closes, and at
least once a second (`sweep_mappings`).
"""
import hashlib
import hmac
import mmap
import os
import secrets
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import BAD_ARENA, NO_MEMORY, ProtocolError
from psana_ipc.protocol.messages import Into, frame_nbytes
from psana_ipc.protocol.shm_names import is_own_file, parse_segment_name, segment_path

from .shared_state import Grant
from .shm import Segment, round_up
from .slots import Holding, refusal
from .sources.base import Allocator

GROUP_KEY = secrets.token_bytes(32)   # made in the master at import; forked workers share it
MAX_MAPPED = 64                       # arenas a worker keeps mapped to write into
SWEEP_SECONDS = 1.0
POPULATE = getattr(mmap, "MAP_POPULATE", 0)
DTYPE_KINDS = "biufc"


def _mac(purpose: str, text: str) -> str:
    return hmac.new(GROUP_KEY, f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()[:16]


def issue_group() -> str:
    """A new connection group id, which only this server can have made."""
    nonce = secrets.token_hex(8)
    return f"{nonce}.{_mac('group', nonce)}"


def group_is_ours(group: str) -> bool:
    nonce, _, mac = group.partition(".")
    return bool(nonce) and hmac.compare_digest(mac.encode(), _mac("group", nonce).encode())


def arena_kind(group: str) -> str:
    """What an arena's segment serial starts with for `group`."""
    return f"a{_mac('arena', group)[:12]}x"


def _refuse(message: str) -> ProtocolError:
    return ProtocolError(BAD_ARENA, message)


def _gone(name: str, error: OSError) -> ProtocolError:
    return _refuse(f"arena {name} cannot be opened ({error.strerror}): its connection closed?")


def _frame_layout(into: Into) -> Tuple[np.dtype, int]:
    """The dtype and byte size of one frame as the request laid it out."""
    try:
        dtype = np.dtype(into.dtype)
    except (TypeError, ValueError):
        raise _refuse(f"dtype {into.dtype!r} is not a numpy dtype") from None
    if dtype.kind not in DTYPE_KINDS or dtype.itemsize == 0 or dtype.fields is not None:
        raise _refuse(f"dtype {into.dtype!r} is not a plain numeric dtype")
    return dtype, frame_nbytes(into.shape, dtype.itemsize)


class _Mapped:
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | POPULATE)

    def alive(self) -> bool:
        return os.fstat(self.fd).st_nlink > 0

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass      # a frame being written pins it; it goes with that array
        os.close(self.fd)


class _Mappings:
    """The arenas this worker process has mapped to write into, by inode and
    shared by its connections: an arena is mapped, its page tables filled at
    once (MAP_POPULATE), once per worker rather than once per connection, so
    the DataLoader workers of a later epoch write into warm mappings (a fresh
    mapping faults every page on its first write: several times the copy).
    Mappings of unlinked arenas are dropped when a connection closes and
    every SWEEP_SECONDS (their pages go with the last mapping)."""

    def __init__(self) -> None:
        self._maps: "OrderedDict[Tuple[int, int], _Mapped]" = OrderedDict()
        self._swept = 0.0

    def find(self, st: os.stat_result) -> Optional[_Mapped]:
        """The mapping of the file `st` describes, if this worker has one."""
        key = (st.st_dev, st.st_ino)
        mapped = self._maps.get(key)
        if mapped is not None:
            self._maps.move_to_end(key)
        return mapped

    def add(self, fd: int, st: os.stat_result) -> _Mapped:
        """Map the file behind `fd` (which this takes over)."""
        mapped = self._maps[st.st_dev, st.st_ino] = _Mapped(fd, st.st_size)
        while len(self._maps) > MAX_MAPPED:
            self._maps.popitem(last=False)[1].close()
        return mapped

    def drop_unlinked(self) -> None:
        for key, mapped in list(self._maps.items()):
            if not mapped.alive():
                del self._maps[key]
                mapped.close()

    def sweep(self, now: float) -> None:
        if now - self._swept >= SWEEP_SECONDS:
            self._swept = now
            self.drop_unlinked()


MAPPINGS = _Mappings()     # made empty in the master; each forked worker fills its own


class Arenas:
    """The arenas one connection made, and the group's arenas it has mapped to
    write into."""

    def __init__(self, holding: Holding, group: str) -> None:
        self.holding = holding
        self.kind = arena_kind(group)
        self.made: Dict[str, Segment] = {}

    # -- making ---------------------------------------------------------------------
    def reserve(self, nbytes: int, wait: bool) -> Grant:
        """The bytes of a new arena; without `wait`, `no_memory` at once when
        there is no room now (the client copies frames instead)."""
        size = round_up(nbytes)
        grant = Grant.TOO_LARGE if size > self.holding.budget.limit else self.holding.take(size)
        if grant is Grant.TOO_LARGE or (grant is Grant.WAIT and not wait):
            raise ProtocolError(NO_MEMORY, refusal(grant, size, self.holding.budget.limit,
                                                   "an arena"))
        return grant

    def make(self, nbytes: int) -> Segment:
        """The arena whose bytes `reserve` granted."""
        size = round_up(nbytes)
        try:
            segment = self.holding.budget.segment(size, self.kind)
        except BaseException:
            self.holding.give(size)
            raise
        self.made[segment.name] = segment
        return segment

    def free(self, names: Tuple[str, ...]) -> List[str]:
        """Unlink arenas this connection made; returns the names that were not."""
        bad = []
        for name in names:
            segment = self.made.pop(name, None)
            if segment is None:
                bad.append(name)
                continue
            segment.destroy()
            self.holding.give(segment.size)
        return bad

    def adopt(self, name: str) -> Segment:
        """Keep an arena another connection of the group made (see AdoptArena):
        its bytes are taken from this connection's fair share of the budget
        like any (adopting is no way around the share), never waited for, and
        it gets a name of this worker's, so the maker's close no longer
        unlinks it. The maker still counts it until it frees its old name."""
        fd, st = self._open(name)
        os.close(fd)
        size = st.st_size
        grant = self.holding.take(size)
        if grant is not Grant.GRANTED:
            raise ProtocolError(NO_MEMORY, refusal(grant, size, self.holding.budget.limit,
                                                   "an arena"))
        try:
            segment = self.holding.budget.segment(size, self.kind, take_over=name)
        except FileNotFoundError:
            self.holding.give(size)
            raise _refuse(f"arena {name} is gone: its connection closed?") from None
        except BaseException:
            self.holding.give(size)
            raise
        self.made[segment.name] = segment
        return segment

    # -- writing --------------------------------------------------------------------
    def allocator(self, into: Into, seq: int) -> Tuple[Allocator, int]:
        """Frame `seq` of a get, as an allocator over its place in the arena
        and the bytes it may take; refuses (`bad_arena`) an arena that is not
        this group's, an offset out of bounds or misaligned, and (when the
        source calls it) a frame unlike the one laid out."""
        dtype, nbytes = _frame_layout(into)
        offset = into.offsets[seq]
        if offset % dtype.itemsize:
            raise _refuse(f"offset {offset} is not aligned to the {dtype.itemsize}-byte dtype "
                          f"{into.dtype}")
        mapped = self._map(into.arena)
        if offset + nbytes > mapped.size:
            raise _refuse(f"a frame of {nbytes} bytes at offset {offset} runs past the end of "
                          f"arena {into.arena} ({mapped.size} bytes)")
        expected = (tuple(into.shape), dtype)

        def place(shape: Tuple[int, ...], dt: np.dtype) -> np.ndarray:
            if (tuple(shape), np.dtype(dt)) != expected:
                raise _refuse(f"the frame is {np.dtype(dt).str} {list(shape)}, the arena was "
                              f"laid out for {into.dtype} {list(into.shape)}")
            return np.ndarray(shape, dtype=dt, buffer=mapped.map, offset=offset)
        return place, nbytes

    def _map(self, name: str) -> _Mapped:
        """The mapping (this worker's, shared by its connections) of an arena
        of this group: one `stat` per frame once mapped (the name may lead to
        another file since: a new inode is a new, checked mapping)."""
        path = self._path(name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as e:
            raise _gone(name, e) from None
        return MAPPINGS.find(st) or MAPPINGS.add(*self._open(name))

    def _path(self, name: str) -> str:
        """Where an arena of this group lives, refusing any other name."""
        parsed = parse_segment_name(name)
        if (parsed is None or parsed.server_pid != self.holding.budget.server_pid
                or not parsed.serial.startswith(self.kind)):
            raise _refuse(f"{name!r} is not an arena of this connection group")
        return segment_path(name)

    def _open(self, name: str) -> Tuple[int, os.stat_result]:
        """A descriptor of an arena of this group and its status, refusing any
        other name or file."""
        try:
            fd = os.open(self._path(name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise _gone(name, e) from None
        st = os.fstat(fd)
        if not is_own_file(st.st_mode, st.st_uid, os.geteuid()) or not st.st_size:
            os.close(fd)
            raise _refuse(f"arena {name} is not a segment this server made")
        return fd, st

    def close(self) -> None:
        """Unlink what this connection made (never truncate: see the module
        docstring) and drop the mappings of unlinked arenas."""
        for segment in self.made.values():
            segment.destroy()
            self.holding.give(segment.size)
        self.made.clear()
        MAPPINGS.drop_unlinked()


def sweep_mappings(now: float) -> None:
    """Drop this worker's mappings of unlinked arenas, at most once a second."""
    MAPPINGS.sweep(now)
