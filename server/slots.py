"""Reusable shared-memory slots: a worker's segment allocator and the pool
each v1 connection keeps.

A slot is written by the server, read by the client, then released and
written again, so pages are faulted in once per slot instead of once per
event. The pool never holds more than its window of slots, and every
segment is created against the server-wide budget.
"""
import itertools
import os
from typing import Callable, Dict, Iterable, List

from psana_ipc.protocol.errors import NO_MEMORY
from psana_ipc.protocol.shm_names import segment_name

from .shared_state import COL, SharedState
from .shm import Segment, ShmFullError, round_up
from .sources.base import SourceError


class BudgetExhausted(SourceError):
    """The budget is in use; worth waiting for, unlike a full /dev/shm."""

    def __init__(self, budget: int) -> None:
        super().__init__(NO_MEMORY, f"shared-memory budget of {budget} bytes is in use; "
                                    f"try again later")


class SegmentAllocator:
    """Creates and destroys one worker's segments, accounted in the shared budget."""

    def __init__(self, state: SharedState, slot: int, server_pid: int) -> None:
        self.state = state
        self.slot = slot
        self.server_pid = server_pid
        self._serial = itertools.count()
        self.on_pressure: Callable[[], int] = lambda: 0   # frees idle memory, returns bytes

    def create(self, nbytes: int) -> Segment:
        """A new segment of at least `nbytes`. BudgetExhausted when the budget has
        no room even after this worker's idle slots are freed (the other workers
        are then asked to free theirs); SourceError(NO_MEMORY) when /dev/shm is full."""
        size = round_up(nbytes)
        if not self.state.reserve(self.slot, size):
            self.on_pressure()
            if not self.state.reserve(self.slot, size):
                self.state.request_trim()
                raise BudgetExhausted(self.state.shm_budget)
        name = segment_name(self.server_pid, os.getpid(), format(next(self._serial), "x"))
        try:
            return Segment(name, size)
        except ShmFullError as e:
            self.state.unreserve(self.slot, size)
            raise SourceError(NO_MEMORY, str(e)) from e
        except BaseException:
            self.state.unreserve(self.slot, size)
            raise

    def destroy(self, segment: Segment) -> None:
        segment.destroy()
        self.state.unreserve(self.slot, segment.size)


class Slot:
    def __init__(self, sid: int, segment: Segment) -> None:
        self.id = sid
        self.segment = segment
        self.busy = False


class SlotPool:
    """At most `window` slots of one connection; busy ones wait for `release`."""

    def __init__(self, allocator: SegmentAllocator, window: int) -> None:
        self.allocator = allocator
        self.window = window
        self.slots: Dict[int, Slot] = {}
        self._ids = itertools.count()
        self._row = allocator.state.row(allocator.slot)

    @property
    def busy_count(self) -> int:
        return sum(s.busy for s in self.slots.values())

    def has_capacity(self) -> bool:
        return self.busy_count < self.window

    def acquire(self, nbytes: int) -> Slot:
        """A free slot that fits (the smallest), else a new or regrown one."""
        free = [s for s in self.slots.values() if not s.busy]
        fitting = [s for s in free if s.segment.size >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: s.segment.size)
        else:
            if len(self.slots) >= self.window and free:
                self._drop(free[0])
            slot = Slot(next(self._ids), self.allocator.create(nbytes))
            self.slots[slot.id] = slot
        slot.busy = True
        self._row[COL["inflight"]] += 1
        return slot

    def release(self, ids: Iterable[int]) -> List[int]:
        """Mark slots free; returns the ids that were not busy slots of ours."""
        bad = []
        for sid in ids:
            slot = self.slots.get(sid)
            if slot is None or not slot.busy:
                bad.append(sid)
                continue
            slot.busy = False
            self._row[COL["inflight"]] -= 1
        return bad

    def trim(self) -> int:
        """Destroy idle slots; returns the bytes given back to the budget."""
        freed = 0
        for slot in [s for s in self.slots.values() if not s.busy]:
            freed += slot.segment.size
            self._drop(slot)
        return freed

    def close(self) -> None:
        self._row[COL["inflight"]] -= self.busy_count
        for slot in list(self.slots.values()):
            self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        del self.slots[slot.id]
        self.allocator.destroy(slot.segment)
