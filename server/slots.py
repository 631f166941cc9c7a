"""The budget a worker's connections draw from, and the reusable slots of a
v1 connection.

Every frame's memory follows one lifecycle (README, "Reliability on a shared node"):
reserve its bytes first (`Holding.take`, within the server-wide budget and
the connection's fair share), write the frame into it once, hand it over,
take it back on release, and retire it (truncate, then unlink) when the
server gives it back. A slot is written by the server, read by the client,
then released and written again, so pages are faulted in once per slot
instead of once per event. Nothing here waits: a reservation that finds no
room answers `Grant.WAIT` and the worker decides.
"""
import itertools
import os
from typing import Dict, Iterable, List, Optional, Tuple

from psana_ipc.protocol.errors import NO_MEMORY, ProtocolError
from psana_ipc.protocol.shm_names import segment_name

from .shared_state import Counters, Grant, SharedState
from .shm import Segment, ShmFullError, round_up


class Budget:
    """One worker's side of the server-wide budget, and the segments it makes."""

    def __init__(self, state: SharedState, counters: Counters, server_pid: int) -> None:
        self.state = state
        self.counters = counters
        self.server_pid = server_pid
        self._serial = itertools.count()

    @property
    def limit(self) -> int:
        return self.state.shm_budget

    def _next_name(self, kind: str) -> str:
        return segment_name(self.server_pid, os.getpid(), kind + format(next(self._serial), "x"))

    def segment(self, size: int, kind: str = "", take_over: Optional[str] = None) -> Segment:
        """A new segment of `size` bytes, already reserved, its serial starting
        with `kind` (batch arenas), or the segment `take_over` under a new name
        of this worker's; a full /dev/shm is the error `no_memory`."""
        try:
            return Segment(lambda: self._next_name(kind), size, take_over)
        except ShmFullError as e:
            raise ProtocolError(NO_MEMORY, str(e)) from e


class Holding:
    """What one connection holds of the budget: its segments and its inline
    frames not sent yet."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.bytes = 0

    def take(self, nbytes: int) -> Grant:
        grant = self.budget.state.reserve(self.budget.counters.slot, nbytes, self.bytes)
        if grant is Grant.GRANTED:
            self.bytes += nbytes
        return grant

    def give(self, nbytes: int) -> None:
        self.bytes -= nbytes
        self.budget.state.unreserve(self.budget.counters.slot, nbytes, self.bytes)

    def over_share(self) -> bool:
        return self.bytes > self.budget.state.share()


def refusal(grant: Grant, nbytes: int, budget: int, what: str = "a frame") -> str:
    """Why `nbytes` for `what` were not granted."""
    return (_too_large if grant is Grant.TOO_LARGE else _budget_in_use)(nbytes, budget, what)


def _too_large(nbytes: int, budget: int, what: str) -> str:
    return (f"{what} of {nbytes} bytes is larger than the whole shared-memory budget of "
            f"{budget} bytes (iserver --shm-budget)")


def _budget_in_use(nbytes: int, budget: int, what: str) -> str:
    return (f"no room for {what} of {nbytes} bytes: the shared-memory budget of {budget} bytes "
            f"is in use (this connection's share is budget / (clients holding memory + 1)); "
            f"release frames or try again later")


class Slot:
    def __init__(self, sid: int, segment: Segment) -> None:
        self.id = sid
        self.segment = segment
        self.busy = False


class SlotPool:
    """At most `window` slots of one connection; busy ones wait for `release`.
    The ids of slots retired since the last reply are in `retired`, for the
    client to drop its mappings."""

    def __init__(self, budget: Budget, window: int) -> None:
        self.budget = budget
        self.holding = Holding(budget)
        self.window = window
        self.slots: Dict[int, Slot] = {}
        self.retired: List[int] = []
        self._ids = itertools.count()

    def new_id(self) -> int:
        """A handle the client releases, never reused on this connection (slots,
        and the frame-cache entries handed over beside them)."""
        return next(self._ids)

    @property
    def busy_count(self) -> int:
        return sum(s.busy for s in self.slots.values())

    def has_capacity(self) -> bool:
        return self.busy_count < self.window

    def _idle(self) -> List[Slot]:
        return [s for s in self.slots.values() if not s.busy]

    def reserve(self, nbytes: int) -> Tuple[Grant, Optional[Slot]]:
        """A slot for a frame of `nbytes`, marked busy: the smallest idle one
        that fits, else a new one if the budget allows (idle slots that do
        not fit are retired first when the pool is full)."""
        fitting = [s for s in self._idle() if s.segment.size >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: s.segment.size)
        else:
            size = round_up(nbytes)
            if size > self.budget.limit:
                return Grant.TOO_LARGE, None
            idle = self._idle()
            if idle and len(self.slots) >= self.window:
                self._retire(idle[0])
            grant = self.holding.take(size)
            if grant is not Grant.GRANTED:
                return grant, None
            try:
                segment = self.budget.segment(size)
            except BaseException:
                self.holding.give(size)
                raise
            slot = Slot(self.new_id(), segment)
            self.slots[slot.id] = slot
        slot.busy = True
        self.budget.counters.inflight(1)
        return Grant.GRANTED, slot

    def release(self, ids: Iterable[int]) -> List[int]:
        """Mark slots idle, retiring what is then over the fair share; returns
        the ids that were not busy slots of ours."""
        bad = []
        for sid in ids:
            slot = self.slots.get(sid)
            if slot is None or not slot.busy:
                bad.append(sid)
                continue
            slot.busy = False
            self.budget.counters.inflight(-1)
        self.trim(everything=False)
        return bad

    def trim(self, everything: bool) -> int:
        """Retire idle slots: all of them, or only while over the fair share.
        Returns the bytes given back."""
        freed = 0
        for slot in sorted(self._idle(), key=lambda s: -s.segment.size):
            if not (everything or self.holding.over_share()):
                break
            freed += slot.segment.size
            self._retire(slot)
        return freed

    def close(self) -> None:
        """Retire idle slots; busy ones (a client may still read them) are only unlinked."""
        self.budget.counters.inflight(-self.busy_count)
        for slot in list(self.slots.values()):
            if slot.busy:
                slot.segment.destroy()
                self._forget(slot)
            else:
                self._retire(slot)

    def _retire(self, slot: Slot) -> None:
        slot.segment.retire()
        self.retired.append(slot.id)
        self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        del self.slots[slot.id]
        self.holding.give(slot.segment.size)
