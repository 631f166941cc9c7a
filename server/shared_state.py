"""Counters every process of one server can see: one row per worker slot in
an anonymous shared mapping made by the master before it forks.

A worker writes only its own row (through `Counters`), so counters need no
lock; the shared-memory budget is the one read-modify-write across workers
and takes a POSIX record lock (process_lock.py), which the kernel drops if
its holder dies (a lock held by a SIGKILLed worker cannot wedge the server).
The column layout is private to this module.
"""
import enum
import mmap
import time
from contextlib import contextmanager
from typing import ContextManager, Dict, Iterator, List

import numpy as np

from psana_ipc.protocol.errors import ALL_CODES

from .process_lock import ProcessLock

CODES = sorted(ALL_CODES)
_FIELDS = ["pid", "ready", "connections", "shm_bytes", "inflight", "events", "bytes",
           "busy_since_ns", "requests", "trims", "holders", "progress_ns"] \
    + [f"error:{c}" for c in CODES]
_COL = {name: i for i, name in enumerate(_FIELDS)}
_GAUGES = ("connections", "shm_bytes", "inflight", "busy_since_ns", "ready", "pid", "holders",
           "progress_ns")


class Grant(enum.Enum):
    """The budget's answer to a reservation."""
    GRANTED = "granted"
    WAIT = "wait"              # no room now: worth waiting for a release
    TOO_LARGE = "too large"    # larger than the whole budget: never
    PENDING = "pending"        # another worker is writing this frame into the frame cache


class Counters:
    """One worker's row: what it counts and the gauges the master and `stats` read."""

    def __init__(self, state: "SharedState", slot: int) -> None:
        self._row = state.table[slot]
        self.slot = slot

    def _add(self, name: str, n: int) -> None:
        self._row[_COL[name]] += n

    def started(self, pid: int) -> None:
        self._row[_COL["pid"]] = pid
        self._row[_COL["ready"]] = 1
        self.progress()

    def stopped(self) -> None:
        self._row[_COL["ready"]] = 0

    def connection(self, n: int) -> None:
        self._add("connections", n)

    def request(self) -> None:
        self._add("requests", 1)

    def frame(self, nbytes: int) -> None:
        self._add("events", 1)
        self._add("bytes", nbytes)

    def inflight(self, n: int) -> None:
        self._add("inflight", n)

    def error(self, code: str) -> None:
        self._add("error:" + code, 1)

    def progress(self) -> None:
        """The worker's loop went round: it is neither frozen nor stuck in a source."""
        self._row[_COL["progress_ns"]] = time.monotonic_ns()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark the worker as inside a source call, for the master's watchdog."""
        self._row[_COL["busy_since_ns"]] = time.monotonic_ns()
        try:
            yield
        finally:
            self._row[_COL["busy_since_ns"]] = 0


class SharedState:
    """Per-worker rows plus one server-wide row (the peak budget use, and how
    many times a worker short of budget asked the others to free idle slots)."""

    def __init__(self, workers: int, shm_budget: int) -> None:
        self.workers = workers
        self.shm_budget = shm_budget
        self._map = mmap.mmap(-1, (workers + 1) * len(_FIELDS) * 8)
        self.table = np.ndarray((workers + 1, len(_FIELDS)), np.int64, buffer=self._map)
        self._lock = ProcessLock()

    def counters(self, slot: int) -> Counters:
        return Counters(self, slot)

    def _locked(self) -> ContextManager[None]:
        return self._lock.held()

    def _total(self, name: str) -> int:
        return int(self.table[: self.workers, _COL[name]].sum())

    def reserve(self, slot: int, nbytes: int, held: int) -> Grant:
        """Account `nbytes` more to a connection of a worker that holds `held`
        already, if the budget and the connection's fair share allow. A
        connection holding nothing may take any room left (and becomes one of
        the holders); one holding memory stays within
        budget // (connections holding memory + 1), so newcomers always find room."""
        if nbytes > self.shm_budget:
            return Grant.TOO_LARGE
        with self._locked():
            in_use = self._total("shm_bytes")
            if in_use + nbytes > self.shm_budget:
                return Grant.WAIT
            share = self.shm_budget // (self._total("holders") + 1)
            if held and held + nbytes > share:
                return Grant.WAIT
            self.table[slot, _COL["shm_bytes"]] += nbytes
            if not held:
                self.table[slot, _COL["holders"]] += 1
            peak = _COL["shm_bytes"]
            self.table[self.workers, peak] = max(int(self.table[self.workers, peak]), in_use + nbytes)
            return Grant.GRANTED

    def unreserve(self, slot: int, nbytes: int, still_held: int) -> None:
        """Give `nbytes` back; a connection left holding nothing is no longer a holder."""
        with self._locked():
            self.table[slot, _COL["shm_bytes"]] -= nbytes
            if not still_held:
                self.table[slot, _COL["holders"]] -= 1

    def share(self) -> int:
        """What one connection holding memory may keep: its part of the budget
        split among the holders (newcomers get room by pressure on idle slots)."""
        return self.shm_budget // max(1, self._total("holders"))

    def request_trim(self) -> None:
        """Ask every worker to give its idle slots back to the budget."""
        with self._locked():
            self.table[self.workers, _COL["trims"]] += 1

    def trim_requests(self) -> int:
        return int(self.table[self.workers, _COL["trims"]])

    # -- the master's view ------------------------------------------------------------
    def reset_gauges(self, slot: int) -> None:
        """Forget what a dead worker held; its counters stay in the totals."""
        with self._locked():
            for name in _GAUGES:
                self.table[slot, _COL[name]] = 0

    def booted(self, slot: int) -> bool:
        return bool(self.table[slot, _COL["ready"]] > 0)

    def stalled_workers(self, older_than_s: float) -> List[int]:
        """Ready workers whose loop has not gone round for that long: stuck in a
        source call, or frozen (SIGSTOPped, or a hang outside any source call)."""
        now = time.monotonic_ns()
        rows = self.table[: self.workers]
        stale = now - rows[:, _COL["progress_ns"]] > older_than_s * 1e9
        return [int(s) for s in np.nonzero(stale & (rows[:, _COL["ready"]] > 0))[0]]

    def in_source_call(self, slot: int) -> bool:
        return bool(self.table[slot, _COL["busy_since_ns"]] > 0)

    def least_loaded(self, slot: int) -> bool:
        """True if no ready worker has fewer connections than this one."""
        rows = self.table[: self.workers]
        ready = rows[:, _COL["ready"]] > 0
        conns = rows[ready, _COL["connections"]]
        return conns.size == 0 or rows[slot, _COL["connections"]] <= conns.min()

    def all_ready(self) -> bool:
        return bool((self.table[: self.workers, _COL["ready"]] > 0).all())

    def stats(self) -> Dict[str, object]:
        rows = self.table[: self.workers]
        total = rows.sum(axis=0)
        errors = {c: int(total[_COL["error:" + c]]) for c in CODES if total[_COL["error:" + c]]}
        return {
            "workers": int((rows[:, _COL["ready"]] > 0).sum()),
            "connections": int(total[_COL["connections"]]),
            "requests": int(total[_COL["requests"]]),
            "events": int(total[_COL["events"]]),
            "bytes": int(total[_COL["bytes"]]),
            "errors": errors,
            "inflight_slots": int(total[_COL["inflight"]]),
            "shm_bytes": int(total[_COL["shm_bytes"]]),
            "shm_peak_bytes": int(self.table[self.workers, _COL["shm_bytes"]]),
            "shm_budget": self.shm_budget,
            "holders": int(total[_COL["holders"]]),
        }
