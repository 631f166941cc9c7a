"""A test-only source that misbehaves on purpose: the synthetic source, except
that event RAISE_EVENT raises, event HANG_EVENT never returns and opening a run
numbered SLOW_RUNS or above takes SLOW_OPEN_S (psana opening a run on a loaded
node).

Loaded by a server started with PSANA_IPC_SOURCES=faulty=faulty_source and
tests/ on PYTHONPATH; `server_env()` gives that environment. Beside it:
`probes` (looking at a running server from outside) and `small_shm` (a run
inside a mount namespace whose /dev/shm is tiny).
"""
import os
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from psana_ipc.protocol.messages import RunKey
from psana_ipc.server.sources import ENV_SOURCES
from psana_ipc.server.sources import synthetic
from psana_ipc.server.sources.base import Allocator, FrameMeta, FrameSpec, Source

RAISE_EVENT = 13
HANG_EVENT = 17
SLOW_RUNS = 100
SLOW_OPEN_S = 2.0
TESTS = Path(__file__).resolve().parents[1]


def server_env() -> Dict[str, str]:
    """The environment a server needs to offer `--source faulty`."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {ENV_SOURCES: "faulty=faulty_source", "PYTHONPATH": path}


class FaultySource(Source):
    """Wraps a synthetic source; fails on the two chosen events. It cannot
    tell a frame's size before reading it (as a source of variable frames),
    and logs every event it reads to $PSANA_IPC_TEST_READ_LOG if set."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.read_log = os.environ.get("PSANA_IPC_TEST_READ_LOG")

    def __len__(self) -> int:
        return len(self.inner)

    def specs(self) -> Dict[str, FrameSpec]:
        return self.inner.specs()

    def frame_nbytes(self, mode: str) -> None:
        return None

    def read_into(self, index: int, mode: str, allocate: Allocator) -> Tuple[np.ndarray, FrameMeta]:
        if self.read_log:
            with open(self.read_log, "a") as f:
                f.write(f"{index}\n")
        if index == RAISE_EVENT:
            raise RuntimeError(f"event {index} is corrupt on purpose")
        if index == HANG_EVENT:
            while True:          # a psana call that never comes back
                time.sleep(3600)
        return self.inner.read_into(index, mode, allocate)


class Factory(synthetic.Factory):
    name = "faulty"

    @staticmethod
    def add_arguments(parser) -> None:
        """Only the synthetic source's options, which iserver adds already."""

    def open(self, key: RunKey) -> Source:
        if key.run >= SLOW_RUNS:
            time.sleep(SLOW_OPEN_S)
        return FaultySource(super().open(key))
