"""The timing system's event codes of every event, for choosing events by them.

LCLS-II's timing detector (psana's `ts` classes, usually named `timing`)
answers `eventcodes(evt)`: one 0/1 per event code (288 of them), which pump-
probe analyses filter on (laser on or off, ...). The codes of every event are
read once per run and worker, from the timing detector's own records only
(a few hundred bytes an event, not the events' big data), with psana's own
`eventcodes`. An event the timing detector has no record of has no codes and
is chosen by no filter.
"""
from typing import Any, Callable, List, Optional, Sequence, Set

import numpy as np

from psana_ipc.protocol.errors import UNKNOWN_DETECTOR
from psana_ipc.protocol.messages import CodeFilter

from .base import SourceError


def codes_method(classes: Any) -> Optional[str]:
    """The interface of a detector whose class gives event codes, if any;
    `classes`: interface name -> psana class."""
    return next((iface for iface, cls in sorted(classes.items())
                 if callable(getattr(cls, "eventcodes", None))), None)


class EventCodes:
    """Per event holding the timing detector `detector`, which codes it holds
    (a row of booleans; no row without the timing detector). Rows are added
    as events are known (a live run's grow)."""

    def __init__(self, detector: str, read: Callable[[int], Any]) -> None:
        """`read(event)`: psana's eventcodes of an event holding the detector."""
        self.detector = detector
        self._read = read
        self.held: List[int] = []
        self._rows: List[np.ndarray] = []
        self._codes: Optional[np.ndarray] = None

    def add(self, events: Sequence[int]) -> None:
        """The codes of more events holding the timing detector, in order."""
        for event in events:
            self.held.append(event)
            self._rows.append(np.asarray(self._read(event), bool))
        if events:
            self._codes = None

    @property
    def codes(self) -> np.ndarray:
        """(events, codes) booleans, codes past an event's own False."""
        if self._codes is None:
            width = max((len(r) for r in self._rows), default=0)
            self._codes = np.zeros((len(self._rows), width), bool)
            for row, codes in zip(self._codes, self._rows):
                row[:len(codes)] = codes
        return self._codes

    def events(self, chosen: CodeFilter) -> List[int]:
        """The events holding every code of `with_codes` and none of
        `without_codes`; a code past those psana gives is held by no event."""
        keep = np.ones(len(self.held), bool)
        for code in chosen.with_codes:
            keep &= self.column(code)
        for code in chosen.without_codes:
            keep &= ~self.column(code)
        return np.asarray(self.held, np.int64)[keep].tolist()

    def column(self, code: int) -> np.ndarray:
        if code < self.codes.shape[1]:
            return self.codes[:, code]
        return np.zeros(len(self.held), bool)


def no_timing(exp: str, run: int, found: Set[str]) -> SourceError:
    return SourceError(UNKNOWN_DETECTOR, f"run {run} of {exp} has no timing detector giving "
                                         f"event codes (psana's eventcodes), so events cannot be "
                                         f"chosen by event code; its detectors: "
                                         f"{', '.join(sorted(found)) or 'none'}")
