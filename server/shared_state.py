"""Counters every process of one server can see: one row per worker slot in
an anonymous shared mapping made by the master before it forks.

A worker writes only its own row, so counters need no lock; the shared-memory
budget is the one read-modify-write across workers and takes a POSIX record
lock, which the kernel drops if its holder dies (a lock held by a SIGKILLed
worker cannot wedge the server).
"""
import fcntl
import mmap
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List

import numpy as np

from psana_ipc.protocol.errors import ALL_CODES

CODES = sorted(ALL_CODES)
FIELDS = ["pid", "ready", "connections", "shm_bytes", "inflight", "events", "bytes",
          "busy_since_ns", "requests", "trims"] + [f"error:{c}" for c in CODES]
COL = {name: i for i, name in enumerate(FIELDS)}
GAUGES = ("connections", "shm_bytes", "inflight", "busy_since_ns", "ready", "pid")


class SharedState:
    """Per-worker rows plus one server-wide row (the peak shm use, and how many
    times a worker short of budget asked the others to free idle slots)."""

    def __init__(self, workers: int, shm_budget: int) -> None:
        self.workers = workers
        self.shm_budget = shm_budget
        self._map = mmap.mmap(-1, (workers + 1) * len(FIELDS) * 8)
        self.table = np.ndarray((workers + 1, len(FIELDS)), np.int64, buffer=self._map)
        self._lockfile = tempfile.TemporaryFile()

    # -- a worker's own row ---------------------------------------------------------
    def row(self, slot: int) -> np.ndarray:
        return self.table[slot]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._lockfile, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._lockfile, fcntl.LOCK_UN)

    def reserve(self, slot: int, nbytes: int) -> bool:
        """Account `nbytes` of new shared memory to a worker if the budget allows."""
        with self._locked():
            in_use = int(self.table[: self.workers, COL["shm_bytes"]].sum())
            if in_use + nbytes > self.shm_budget:
                return False
            self.table[slot, COL["shm_bytes"]] += nbytes
            peak = COL["shm_bytes"]
            self.table[self.workers, peak] = max(int(self.table[self.workers, peak]), in_use + nbytes)
            return True

    def unreserve(self, slot: int, nbytes: int) -> None:
        with self._locked():
            self.table[slot, COL["shm_bytes"]] -= nbytes

    def request_trim(self) -> None:
        """Ask every worker to give its idle slots back to the budget."""
        with self._locked():
            self.table[self.workers, COL["trims"]] += 1

    def trim_requests(self) -> int:
        return int(self.table[self.workers, COL["trims"]])

    def count_error(self, slot: int, code: str) -> None:
        self.table[slot, COL["error:" + code]] += 1

    @contextmanager
    def busy(self, slot: int) -> Iterator[None]:
        """Mark a worker as inside a source call, for the master's watchdog."""
        self.table[slot, COL["busy_since_ns"]] = time.monotonic_ns()
        try:
            yield
        finally:
            self.table[slot, COL["busy_since_ns"]] = 0

    # -- the master's view ------------------------------------------------------------
    def reset_gauges(self, slot: int) -> None:
        """Forget what a dead worker held; its counters stay in the totals."""
        with self._locked():
            for name in GAUGES:
                self.table[slot, COL[name]] = 0

    def busy_workers(self, older_than_s: float) -> List[int]:
        now = time.monotonic_ns()
        since = self.table[: self.workers, COL["busy_since_ns"]]
        return [int(s) for s in np.nonzero((since > 0) & (now - since > older_than_s * 1e9))[0]]

    def least_loaded(self, slot: int) -> bool:
        """True if no ready worker has fewer connections than this one."""
        rows = self.table[: self.workers]
        ready = rows[:, COL["ready"]] > 0
        conns = rows[ready, COL["connections"]]
        return conns.size == 0 or rows[slot, COL["connections"]] <= conns.min()

    def all_ready(self) -> bool:
        return bool((self.table[: self.workers, COL["ready"]] > 0).all())

    def stats(self) -> Dict[str, object]:
        rows = self.table[: self.workers]
        total = rows.sum(axis=0)
        errors = {c: int(total[COL["error:" + c]]) for c in CODES if total[COL["error:" + c]]}
        return {
            "workers": int((rows[:, COL["ready"]] > 0).sum()),
            "connections": int(total[COL["connections"]]),
            "requests": int(total[COL["requests"]]),
            "events": int(total[COL["events"]]),
            "bytes": int(total[COL["bytes"]]),
            "errors": errors,
            "inflight_slots": int(total[COL["inflight"]]),
            "shm_bytes": int(total[COL["shm_bytes"]]),
            "shm_peak_bytes": int(self.table[self.workers, COL["shm_bytes"]]),
            "shm_budget": self.shm_budget,
        }
