"""Deterministic detector-shaped frames with no dependencies: the default
source, for demos, tests and benchmarks.

Content, for flat pixel index i of the raw shape and s = (101 * event) mod 16384:

    raw   = (i + s) mod 16384                      uint16  (gain bits never set)
    calib = (raw - 10) / 2                         float32 (pedestal 10, gain 2)
    image = calib panels on a grid, GAP zero pixels between panels; a 2-D
            detector is its own image                float32
    mask  = 1, with 0 on the outer pixel ring of every panel   uint8

Every exp and run exists and has `--synthetic-events` events, with timestamp
`(1700000000 + e // 1000) << 32 | (e % 1000) * 1000000` (1 kHz).

Since raw and calib are a window of one periodic sequence, an event is a
single copy of `n` elements starting at offset s of a precomputed array.

`--cost-ms` emulates psana's per-event work: by default (`--cost-kind
burn`) the worker burns that much CPU time (its own thread's clock, so the
cost is the same however busy the node is, as a fixed amount of work would
be) before writing the frame; sleeping instead would let workers overlap on
cores they do not have. `--cost-kind wait` sleeps instead: psana waiting
for a network file system, where more workers, or more servers on other
nodes, do overlap.
"""
import argparse
import time
from typing import Dict, Tuple

import numpy as np

from psana_ipc.protocol.errors import UNKNOWN_DETECTOR
from psana_ipc.protocol.messages import RunKey

from .base import Allocator, FrameMeta, FrameSpec, Source, SourceError, SourceFactory

PERIOD = 16384         # a power of two: `x % PERIOD` is `x & (PERIOD - 1)`, many times cheaper
STEP = 101
PEDESTAL = 10.0
GAIN = 2.0
GAP = 4
SEC0 = 1_068_848_000   # 2023-11-14 as psana2 counts: seconds since the EPICS epoch, 1990

# name -> (raw shape, panel grid (rows, cols) for image assembly or None for 2-D)
DETECTORS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, int]]] = {
    "epix10k2M": ((16, 352, 384), (4, 4)),
    "jungfrau4M": ((8, 512, 1024), (4, 2)),
    "rayonix": ((1920, 1920), None),
    "opal": ((1024, 1024), None),
    "epix100": ((704, 768), None),
}


def burn_cpu(seconds: float) -> None:
    """Keep this thread on a core until it has used `seconds` of CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def timestamp_of(event: int) -> int:
    """The synthetic 64-bit timestamp (sec << 32 | nsec) of an event."""
    return ((SEC0 + event // 1000) << 32) | (event % 1000) * 1_000_000


def expected(detector: str, mode: str, event: int) -> np.ndarray:
    """The reference formula, written plainly; tests compare served bytes to it."""
    shape, grid = DETECTORS[detector]
    n = int(np.prod(shape))
    raw = ((np.arange(n, dtype=np.int64) + STEP * event) & (PERIOD - 1)).astype(np.uint16)
    raw = raw.reshape(shape)
    calib = ((raw.astype(np.float32) - PEDESTAL) / GAIN).astype(np.float32)
    if mode == "raw":
        return raw
    if mode == "calib":
        return calib
    if mode == "image":
        return assemble(calib, grid)
    return panel_mask(shape)


def assemble(panels: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    """Place (n, rows, cols) panels row-major on a grid with GAP-pixel gaps."""
    if grid is None:
        return panels
    gr, gc = grid
    _, pr, pc = panels.shape
    image = np.zeros((gr * pr + (gr - 1) * GAP, gc * pc + (gc - 1) * GAP), panels.dtype)
    for k in range(panels.shape[0]):
        r, c = divmod(k, gc)
        image[r * (pr + GAP):r * (pr + GAP) + pr, c * (pc + GAP):c * (pc + GAP) + pc] = panels[k]
    return image


def panel_mask(shape: Tuple[int, ...]) -> np.ndarray:
    mask = np.ones(shape, np.uint8)
    mask[..., 0, :] = mask[..., -1, :] = 0
    mask[..., :, 0] = mask[..., :, -1] = 0
    return mask


COST_KINDS = {"burn": burn_cpu, "wait": time.sleep}


class SyntheticSource(Source):
    def __init__(self, detector: str, events: int, cost_s: float,
                 cost_kind: str = "burn") -> None:
        shape, self._grid = DETECTORS[detector]
        self._shape = shape
        self._n = int(np.prod(shape))
        self._events = events
        self._cost_s = cost_s
        self._pay = COST_KINDS[cost_kind]
        period = np.arange(PERIOD, dtype=np.int64)       # one period, repeated past n
        repeats = -(-(self._n + PERIOD) // PERIOD)
        self._raw = np.tile(period.astype(np.uint16), repeats)
        self._calib = np.tile(((period - PEDESTAL) / GAIN).astype(np.float32), repeats)
        self._mask = panel_mask(shape)
        image_shape = assemble(np.zeros(shape, np.uint8), self._grid).shape
        self._specs = {
            "raw": FrameSpec(shape, "uint16"),
            "calib": FrameSpec(shape, "float32"),
            "image": FrameSpec(image_shape, "float32"),
            "mask": FrameSpec(shape, "uint8"),
        }

    def __len__(self) -> int:
        return self._events

    def specs(self) -> Dict[str, FrameSpec]:
        return self._specs

    def _meta(self, index: int) -> FrameMeta:
        return FrameMeta(timestamp={"time": timestamp_of(index)})

    def read(self, index: int, mode: str) -> Tuple[np.ndarray, FrameMeta]:
        spec = self._specs[mode]
        out = np.empty(spec.shape, spec.dtype)
        return self.read_into(index, mode, lambda shape, dtype: out)

    def read_into(self, index: int, mode: str, allocate: Allocator) -> Tuple[np.ndarray, FrameMeta]:
        self.check(index, mode)
        spec = self._specs[mode]
        if self._cost_s:
            self._pay(self._cost_s)
        out = allocate(spec.shape, np.dtype(spec.dtype))
        s = (STEP * index) % PERIOD
        if mode == "raw":
            np.copyto(out.reshape(-1), self._raw[s:s + self._n])
        elif mode == "calib":
            np.copyto(out.reshape(-1), self._calib[s:s + self._n])
        elif mode == "mask":
            np.copyto(out, self._mask)
        else:
            out[...] = assemble(self._calib[s:s + self._n].reshape(self._shape), self._grid)
        return out, self._meta(index)


class Factory(SourceFactory):
    name = "synthetic"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("synthetic source")
        group.add_argument("--synthetic-events", type=int, default=1000, metavar="N",
                           help="events in every synthetic run (default: %(default)s)")
        group.add_argument("--cost-ms", type=float, default=0.0, metavar="MS",
                           help="time each event costs, emulating psana's per-event work "
                                "(default: %(default)s)")
        group.add_argument("--cost-kind", choices=sorted(COST_KINDS), default="burn",
                           help="burn: CPU time, as psana computing; wait: a sleep, as psana "
                                "reading a network file system (default: %(default)s)")

    def open(self, key: RunKey) -> Source:
        if key.detector not in DETECTORS:
            raise SourceError(UNKNOWN_DETECTOR, f"unknown detector {key.detector!r}; the "
                                                f"synthetic source has {', '.join(DETECTORS)}")
        return SyntheticSource(key.detector, self.options.synthetic_events,
                               self.options.cost_ms / 1000.0, self.options.cost_kind)

    def detectors(self, exp: str, run: int) -> Dict[str, Dict]:
        return {name: {"shape": list(shape), "events": self.options.synthetic_events}
                for name, (shape, _) in DETECTORS.items()}
