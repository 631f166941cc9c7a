"""Per-event values of an open run, named as fields: `detector.attribute`
(psana's `det.raw.attribute(evt)`), `detector.interface.attribute`,
`epics.<variable>`, `scan.<variable>` and `step.index`.

A field is read beside a frame (its JSON travels in the frame's descriptor),
or served as a frame by its own name (`FieldSource` in psana2). With a
reduction (`sum(f)`, `list(f)`, `count(f)`) it is read over a batch: the
events after the previous event holding the get's detector up to this one,
which is how psana's `DataSource(intg_det=...)` groups the fast events of an
integrating detector (with psana's default `intg_delta_t` of 0).
"""
import bisect
import dataclasses
from typing import Any, Dict, List, Sequence

import numpy as np

from psana_ipc.protocol.errors import NO_DATA, UNKNOWN_DETECTOR
from psana_ipc.protocol.messages import FieldRef

from .base import SourceError
from .psana2_detectors import holds, missing
from .psana2_env import STEP, STEP_INDEX, STORES, env_value, first_update, no_update, step_of
from .psana2_run import OpenRun
from .psana2_values import as_json, reduced, to_array


def field_events(opened: OpenRun, detector: str) -> List[int]:
    """The events that can have a value of `detector`'s fields."""
    if detector in STORES:
        first = first_update(opened.run, detector)
        return [i for i, ts in enumerate(opened.timestamps) if first is not None and ts >= first]
    if detector == STEP:
        return [e for first, stop, _ in opened.steps for e in range(first, stop)]
    opened.detector(detector)           # unknown_detector, naming the run's detectors
    return opened.events_of(detector)


def field_array(opened: OpenRun, index: int, ref: FieldRef) -> np.ndarray:
    """One field's value in event `index` (no_data where it has none)."""
    if ref.detector in STORES:
        value = env_value(opened.run, ref.detector, ref.attribute, opened.timestamps[index])
        if value is None:
            raise no_update(ref.detector, ref.attribute, index)
        return to_array(ref.plain, ref.attribute, value)
    if ref.detector == STEP:
        if ref.attribute != STEP_INDEX:
            raise SourceError(UNKNOWN_DETECTOR, f"field {ref.name!r}: the steps' only field is "
                                                f"'{STEP}.{STEP_INDEX}'; the scan's values are "
                                                f"fields 'scan.<variable>'")
        return np.asarray(step_of(opened.steps, index), np.int64)
    det = opened.detector(ref.detector)
    det.use()
    iface = getattr(det.container, ref.interface, None)
    call = getattr(iface, ref.attribute, None) if iface is not None else None
    if not callable(call):
        raise SourceError(UNKNOWN_DETECTOR, f"field {ref.name!r}: {ref.detector} has no "
                                            f"{ref.interface}.{ref.attribute}")
    if not opened.holds(ref.detector, index):
        raise missing(ref.detector, index)
    evt = opened.event_of(index, ref.detector)
    if not holds(evt, ref.detector, ref.interface):
        raise missing(ref.detector, index)
    value = call(evt)
    if value is None:
        raise SourceError(NO_DATA, f"event {index} has no value of {ref.plain}: psana gives "
                                   f"none for it")
    return to_array(ref.plain, ref.attribute, value)


def batch_of(held: Sequence[int], index: int) -> range:
    """The events of the batch that event `index` (one of `held`) ends."""
    at = bisect.bisect_left(held, index)
    return range(held[at - 1] + 1 if at else 0, index + 1)


def field_json(opened: OpenRun, index: int, ref: FieldRef, held: Sequence[int]) -> Dict[str, Any]:
    """A field's JSON value in event `index`; a reduction over the batch this
    event ends, `held` being the events of the get's detector."""
    if ref.reduce is None:
        return as_json(ref.name, field_array(opened, index, ref), ref.plain)
    inner = dataclasses.replace(ref, reduce=None)
    values = []
    for event in batch_of(held, index):
        try:
            values.append(field_array(opened, event, inner))
        except SourceError as e:
            if e.code != NO_DATA:
                raise
    sample = values[0] if values else first_value(opened, inner)
    return as_json(ref.name, reduced(ref.name, ref.reduce, values, sample), None)


def first_value(opened: OpenRun, ref: FieldRef) -> np.ndarray:
    """The field's value in the first event that has one (its shape and type)."""
    for event in field_events(opened, ref.detector):
        try:
            return field_array(opened, event, ref)
        except SourceError as e:
            if e.code != NO_DATA:
                raise
    raise SourceError(NO_DATA, f"no event of the run has a value of {ref.plain}")
