"""A field served as a frame by its own name: detector `ebeam.ebeamPhotonEnergy`,
`xpphsd.hsd.peaks`, `epics.<variable>`, mode raw.

A value travels beside a frame as JSON only up to a size (psana2_values);
a larger one (a long waveform, a big PV array, many peaks) is asked for as
the frame of a get naming the field as its detector, and a scalar can be
batched this way without another detector. Its shape may change from event
to event (peaks), so its size is known only once it is read. Strings and
records are served as fields only.
"""
import bisect
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import BAD_REQUEST, NO_DATA, NOT_AN_ARRAY
from psana_ipc.protocol.messages import FieldRef

from .base import FrameMeta, FrameSpec, Source, SourceError
from .event_ranges import as_ranges
from .psana2_fields import field_array, field_events, field_json
from .psana2_run import OpenRun

FIELD = "field"


def is_field(detector: str) -> bool:
    """Whether a get's detector names a field rather than a detector."""
    return "." in detector


class FieldSource(Source):
    """One field of an open run, as frames (mode raw)."""

    def __init__(self, factory: Any, opened: OpenRun, name: str) -> None:
        self._factory = factory
        self._opened = opened
        self.ref = FieldRef.parse(name)
        if self.ref.reduce:
            raise SourceError(BAD_REQUEST, f"{name}: a batch's values travel as fields beside "
                                           f"the frame of the detector whose events end the "
                                           f"batches")
        self._held = field_events(opened, self.ref.detector)
        self._known = len(opened.timestamps)     # events when `_held` was found
        self._spec: Optional[Dict[str, FrameSpec]] = None

    def __len__(self) -> int:
        return len(self._opened.timestamps)

    def held(self) -> List[int]:
        """The events with a value of the field (found again as a live run grows)."""
        if self._known != len(self._opened.timestamps):
            self._held = field_events(self._opened, self.ref.detector)
            self._known = len(self._opened.timestamps)
        return self._held

    def check_range(self, index: int) -> None:
        self._opened.reach(index)
        super().check_range(index)

    def growth(self) -> Dict[str, Any]:
        return self._opened.state()

    def modes(self) -> Tuple[str, ...]:
        return ("raw",)

    def specs(self) -> Dict[str, FrameSpec]:
        """The shape of the first value of the run (later ones may differ)."""
        if self._spec is None or (not self._spec and self._opened.live):   # looked for again
            self._spec = {}
            for event in self.held():
                try:
                    value = self.value(event)
                except SourceError as e:
                    if e.code == NO_DATA:
                        continue
                    raise
                self._spec = {"raw": FrameSpec(value.shape, str(value.dtype))}
                break
        return self._spec

    def frame_nbytes(self, mode: str) -> Optional[int]:
        return None

    def check(self, index: int, mode: str) -> None:
        super().check(index, mode)
        held = self.held()
        at = bisect.bisect_left(held, index)
        if at == len(held) or held[at] != index:
            raise SourceError(NO_DATA, f"event {index} has no value of {self.ref.plain}")

    def value(self, index: int) -> np.ndarray:
        value = field_array(self._opened, index, self.ref)
        if value.dtype.kind not in "biuf":
            raise SourceError(NOT_AN_ARRAY, f"{self.ref.name} is not numbers: ask for it as a "
                                            f"field beside a frame")
        return value

    def read(self, index: int, mode: str) -> Tuple[np.ndarray, FrameMeta]:
        return self.value(index), FrameMeta(timestamp={"time": self._opened.timestamps[index]})

    def info(self) -> Dict[str, Any]:
        state = self.growth()      # a live run: brought up to date first
        return dict(super().info(), events=len(self.held()), kind=FIELD, **state)

    def present(self) -> List[List[int]]:
        return as_ranges(self.held())

    def field(self, index: int, ref: FieldRef) -> Dict[str, Any]:
        self.check_range(index)
        return field_json(self._opened, index, ref, self.held())

    def close(self) -> None:
        self._factory.release(self._opened)
