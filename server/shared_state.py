"""Counters every process of one server can see: one row per worker slot in
an anonymous shared mapping made by the master before it forks.

A worker writes only its own row (through `Counters`), so counters need no
lock. The column layout is private to this module.
"""
import mmap
import time
from typing import Dict, List

import numpy as np

from psana_ipc.protocol.errors import ALL_CODES

CODES = sorted(ALL_CODES)
_FIELDS = ["pid", "ready", "connections", "events", "bytes", "busy_since_ns", "requests",
           "progress_ns"] + [f"error:{c}" for c in CODES]
_COL = {name: i for i, name in enumerate(_FIELDS)}
_GAUGES = ("connections", "busy_since_ns", "ready", "pid", "progress_ns")


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

    def error(self, code: str) -> None:
        self._add("error:" + code, 1)

    def progress(self) -> None:
        """The worker's loop went round: it is neither frozen nor stuck in a source."""
        self._row[_COL["progress_ns"]] = time.monotonic_ns()

    def busy(self, inside: bool) -> None:
        """Mark the worker as inside a source call (or out of it), for the
        master's watchdog."""
        self._row[_COL["busy_since_ns"]] = time.monotonic_ns() if inside else 0


class SharedState:
    """Per-worker rows."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, workers * len(_FIELDS) * 8)
        self.table = np.ndarray((workers, len(_FIELDS)), np.int64, buffer=self._map)

    def counters(self, slot: int) -> Counters:
        return Counters(self, slot)

    # -- the master's view ------------------------------------------------------------
    def reset_gauges(self, slot: int) -> None:
        """Forget what a dead worker held; its counters stay in the totals."""
        for name in _GAUGES:
            self.table[slot, _COL[name]] = 0

    def booted(self, slot: int) -> bool:
        return bool(self.table[slot, _COL["ready"]] > 0)

    def stalled_workers(self, older_than_s: float) -> List[int]:
        """Ready workers whose loop has not gone round for that long: stuck in a
        source call, or frozen (SIGSTOPped, or a hang outside any source call)."""
        now = time.monotonic_ns()
        rows = self.table
        stale = now - rows[:, _COL["progress_ns"]] > older_than_s * 1e9
        return [int(s) for s in np.nonzero(stale & (rows[:, _COL["ready"]] > 0))[0]]

    def in_source_call(self, slot: int) -> bool:
        return bool(self.table[slot, _COL["busy_since_ns"]] > 0)

    def least_loaded(self, slot: int) -> bool:
        """True if no ready worker has fewer connections than this one."""
        rows = self.table
        ready = rows[:, _COL["ready"]] > 0
        conns = rows[ready, _COL["connections"]]
        return conns.size == 0 or rows[slot, _COL["connections"]] <= conns.min()

    def all_ready(self) -> bool:
        return bool((self.table[:, _COL["ready"]] > 0).all())

    def stats(self) -> Dict[str, object]:
        rows = self.table
        total = rows.sum(axis=0)
        errors = {c: int(total[_COL["error:" + c]]) for c in CODES if total[_COL["error:" + c]]}
        return {
            "workers": int((rows[:, _COL["ready"]] > 0).sum()),
            "connections": int(total[_COL["connections"]]),
            "requests": int(total[_COL["requests"]]),
            "events": int(total[_COL["events"]]),
            "bytes": int(total[_COL["bytes"]]),
            "errors": errors,
        }
