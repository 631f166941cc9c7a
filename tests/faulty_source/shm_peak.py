"""Run inside a private /dev/shm (see probes.run_in_private_shm): clients
against a server with a small budget, while a thread samples the memory
the server's pool really holds (the pages of its memfd, as the kernel
counts them) and what /dev/shm holds (`df`). Prints, as JSON, the peaks
against the budget.

    idle N     N clients each take one frame, then stay connected and idle,
               keeping their mappings of the pool
    greedy N   one client holds every frame of a window of 8, never
               releasing; then N gets by a second client
"""
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from psana_ipc.client import Client, ServerError
from psana_ipc.server.sources.synthetic import expected

from conftest import ServerProcess
from faulty_source.probes import shm_used

FRAME = ("x", 1, "epix100")          # raw: 704 x 768 uint16, 1.08 MB
BUDGET = 8 << 20


class Peak:
    """The most pages the pool had, and the most /dev/shm held, while it runs."""

    def __init__(self, address: str) -> None:
        self._client = Client(address).connect()
        self._pool = self._client.pools.fds[0]
        self.peak = self.shm_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, os.fstat(self._pool).st_blocks * 512)
        self.shm_peak = max(self.shm_peak, shm_used())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._client.close()
        return self.peak


def idle(address: str, n: int) -> dict:
    clients, served = [], 0
    for k in range(n):
        c = Client(address)
        served += np.array_equal(c.get(*FRAME, k, "raw"), expected("epix100", "raw", k))
        clients.append(c)
    for c in clients:
        c.close()
    return {"served": served}


def greedy(address: str, n: int) -> dict:
    hog, other = Client(address, window=8), Client(address)
    held, refused, served = [], 0, 0
    frames = hog.frames(hog.submit(*FRAME, range(8), "raw"))
    try:
        held.append(next(frames))
        served += sum(np.array_equal(other.get(*FRAME, 100 + k, "raw"),
                                    expected("epix100", "raw", 100 + k)) for k in range(n))
        for frame in frames:
            held.append(frame)
    except ServerError:
        refused += 1
    held_bytes = sum(f.reply.where.size for f in held)
    for f in held:
        f.release()
    hog.close()
    other.close()
    return {"served": served, "hog_held": len(held), "hog_held_bytes": held_bytes,
            "hog_refused": refused}


def main() -> int:
    scenario, n = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["--workers", "2", "--shm-budget", str(BUDGET)], Path(tmp))
        peak = Peak(server.address)
        report = {"idle": idle, "greedy": greedy}[scenario](server.address, n)
        report["peak"] = peak.stop()
        report["shm_peak"] = peak.shm_peak
        report["budget"] = BUDGET
        report["exit_code"] = server.stop()
        report["at_end"] = shm_used()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
