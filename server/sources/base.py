"""The one interface every data source implements.

A source is one detector of one run: it knows how many events it has, the
shape/dtype each mode yields, and reads an event into memory the server
provides. Sources raise `SourceError` with a protocol error code for
anything a user can cause (unknown detector, event out of range, missing
constants); any other exception is reported as `read_failed` (while reading
an event) or `internal` (while answering `info`).
"""
import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.errors import BAD_REQUEST, OUT_OF_RANGE, UNKNOWN_MODE, ProtocolError
from psana_ipc.protocol.messages import CodeFilter, FieldRef, RunKey, frame_nbytes

from .event_ranges import expand

# Gives the memory a frame is written into: (shape, dtype) -> writable array.
Allocator = Callable[[Tuple[int, ...], np.dtype], np.ndarray]
FINISHED = "finished"     # why a run does not grow: it was complete when opened


def frame_bytes(shape: Tuple[int, ...], dtype: Any) -> int:
    """Bytes of a frame of this shape and dtype."""
    return frame_nbytes(shape, np.dtype(dtype).itemsize)


class SourceError(ProtocolError):
    """A failure a user can act on, with the protocol code to reply with."""


@dataclass(frozen=True)
class FrameSpec:
    """What one mode yields: shape and dtype, and whether it is calibrated."""
    shape: Tuple[int, ...]
    dtype: str
    calibrated: bool = True

    @property
    def nbytes(self) -> int:
        return frame_bytes(self.shape, self.dtype)

    def to_json(self) -> Dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "calibrated": self.calibrated}


@dataclass(frozen=True)
class FrameMeta:
    """What a reply says about a frame besides its bytes."""
    timestamp: Optional[Dict[str, int]] = None
    calibrated: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


class Source:
    """One detector of one run. Subclasses implement `__len__`, `specs` and `read`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def specs(self) -> Dict[str, FrameSpec]:
        """Mode -> FrameSpec for every mode this source can serve."""
        raise NotImplementedError

    def modes(self) -> Tuple[str, ...]:
        """Modes a request may ask for; cheaper than `specs` where shapes need a read."""
        return tuple(self.specs())

    def frame_nbytes(self, mode: str) -> Optional[int]:
        """The bytes every frame of `mode` takes, known before reading it, so the
        server reserves memory before any read; None when it cannot be known
        ahead (the server then reads the event first into private memory).
        From `specs` by default."""
        spec = self.specs().get(mode)
        return None if spec is None else spec.nbytes

    def read(self, index: int, mode: str) -> Tuple[np.ndarray, FrameMeta]:
        """The frame of event `index` in `mode`. The array may be a buffer the
        source reuses on its next read (psana does): copy it to keep it."""
        raise NotImplementedError

    def read_into(self, index: int, mode: str, allocate: Allocator) -> Tuple[np.ndarray, FrameMeta]:
        """Write the frame into memory from `allocate`; sources that can produce a
        frame in place override this to skip the intermediate array."""
        self.check(index, mode)
        data, meta = self.read(index, mode)
        out = allocate(data.shape, data.dtype)
        np.copyto(out, data, casting="no")
        return out, meta

    def check(self, index: int, mode: str) -> None:
        """Raise the error a user should see for a mode or event this source lacks."""
        modes = self.modes()
        if mode not in modes:
            raise SourceError(UNKNOWN_MODE, f"mode {mode!r} is not available here; "
                                            f"available: {', '.join(sorted(modes))}")
        self.check_range(index)

    def check_range(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise SourceError(OUT_OF_RANGE, f"event {index} is out of range: the run has "
                                            f"{len(self)} events")

    def info(self) -> Dict[str, Any]:
        return {"events": len(self), "modes": {m: s.to_json() for m, s in self.specs().items()}}

    def present(self) -> List[List[int]]:
        """The events that hold this detector, as [start, stop, step] ranges."""
        return [[0, len(self), 1]]

    def held(self) -> Sequence[int]:
        """The events that hold this detector, in order."""
        return expand(self.present())

    def growth(self) -> Dict[str, Any]:
        """Where this source's run stands: `live` while it may still grow,
        `ended` why it cannot, its events so far (`run_events`) and the
        seconds since it last grew (`idle`). Sources of runs that are
        complete when opened say FINISHED; one reading a run as it is
        written (psana2, or a source fed by the DAQ's shared memory) says
        so, and takes in what was written since its last look first."""
        return {"live": False, "ended": FINISHED, "run_events": len(self), "idle": 0.0}

    def field(self, index: int, ref: FieldRef) -> Dict[str, Any]:
        """A per-event value of another detector of this source's run, as JSON
        {dtype, shape, data}; read before the frame, so that an event lacking
        it costs no frame read."""
        raise SourceError(BAD_REQUEST, f"field {ref.name!r}: this source serves no fields")

    def close(self) -> None:
        """Release files and handles; called when the cache evicts the source."""


class SourceFactory:
    """Opens sources of one kind, configured once from the command line.

    Each source module defines a subclass named `Factory`. Importing the
    module must not import psana or h5py: do that in `open`. `__init__` runs
    once at start-up: options that cannot work raise
    `psana_ipc.server.startup.StartupError` (one line, exit status 3).
    """

    name = ""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this source's options to the iserver command line."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options

    def open(self, key: RunKey) -> Source:
        raise NotImplementedError

    def detectors(self, exp: str, run: int) -> Dict[str, Any]:
        """Detector name -> per-detector info (with its `events`) for `info`
        without a detector."""
        raise NotImplementedError

    def prepare_worker(self) -> None:
        """Called once in each worker process as it starts, before it serves:
        a source whose library takes long to import loads it here, so that no
        request (the first event of a live run, say) waits for it."""

    def run_state(self, exp: str, run: int) -> Dict[str, Any]:
        """What run-level `info` says of a run besides its detectors: for a
        run that may grow, the keys of `Source.growth`; nothing for sources
        whose runs are complete when opened."""
        return {}

    def next_run(self, exp: str, run: int) -> Optional[int]:
        """The experiment's next run that has data (a follow may go on to
        it), or None (also where the source cannot tell)."""
        return None

    def events_with_codes(self, exp: str, run: int, codes: CodeFilter) -> List[int]:
        """The events of a run that the timing system's event codes choose."""
        raise SourceError(BAD_REQUEST, f"{self.name} runs have no timing event codes: events "
                                       f"are chosen by event code in psana2 runs only")

    def close(self) -> None:
        """Release what the factory holds in this process; a worker calls it as it exits."""
