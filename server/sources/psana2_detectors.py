"""What a psana2 detector is, which modes it offers, which events hold it,
and its per-event values beside a frame.

A run holds detectors of every kind; psana picks each interface's class
(`<dettype>_<alg>_<version>`) from what the run declares, so the class says
what the detector can give:

    area      an AreaDetector (epix10ka, jungfrau, opal, cspad, ...): those
              of raw, calib and image its class has, and mask where the class
              has `_mask` and psana has a mask for it
    waveform  a digitizer whose channels psana stacks (wave8 `raw_all`):
              raw only, as a (channels, samples) array
    scalar    everything else (EBeam, gas detectors, beam monitors, ...):
              no frames; its values are read as fields (`ebeam.ebeamPhotonEnergy`)
    epics     the run's EPICS PVs, recorded in SlowUpdate transitions rather
              than in events: fields `epics.<variable>`, the value of the last
              update at or before the event

Which events hold a detector is known without reading them: the run's
timestamp table lists, per event, the streams that have a record of it, and
a stream's Configure record lists its detectors. Detectors read out at a
lower rate are simply absent from the other events' records.
"""
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_DATA, NOT_AN_ARRAY, UNKNOWN_DETECTOR
from psana_ipc.protocol.messages import FieldRef

from .base import SourceError

AREA, WAVEFORM, SCALAR, EPICS = "area", "waveform", "scalar", "epics"
MAX_FIELD_ELEMENTS = 16384      # a field's value travels as JSON: small arrays only


def kind_of(iface: Any) -> str:
    """The kind of a psana interface object or class (see the module docstring)."""
    if callable(getattr(iface, "calib", None)) and callable(getattr(iface, "image", None)):
        return AREA
    if callable(getattr(iface, "raw_all", None)):
        return WAVEFORM
    return SCALAR


def offered_modes(iface: Any, has_mask: bool) -> Tuple[str, ...]:
    """The modes a psana interface object or class offers; `has_mask`: psana
    has a pixel mask for it (only asked of classes that have `_mask`)."""
    kind = kind_of(iface)
    if kind == AREA:
        methods = tuple(m for m in ("raw", "calib", "image") if callable(getattr(iface, m, None)))
        return methods + (("mask",) if has_mask and callable(getattr(iface, "_mask", None))
                          else ())
    if kind == WAVEFORM:
        return ("raw",)
    return ()


def frame_reader(iface: Any) -> Any:
    """The per-event call that gives the detector's raw frame."""
    return iface.raw_all if kind_of(iface) == WAVEFORM else iface.raw


def no_frames(detector: str, iface: Any) -> SourceError:
    return SourceError(NOT_AN_ARRAY, f"{detector} ({type(iface).__name__}) is a scalar "
                                     f"detector and serves no frames; ask for its values as "
                                     f"fields of another detector's get, e.g. "
                                     f"'{detector}.<attribute>'")


def streams_of(configs: Sequence[Any], detector: str) -> Set[int]:
    """The streams whose Configure record declares `detector` (under `software`,
    where psana lists every detector of a stream)."""
    return {i for i, config in enumerate(configs)
            if hasattr(getattr(config, "software", None), detector)}


def events_with(event_streams: Sequence[FrozenSet[int]], streams: Set[int]) -> List[int]:
    """Indices of the events with a record in any of `streams`; events share
    few distinct stream sets, so each set is judged once."""
    judged: Dict[FrozenSet[int], bool] = {}
    held = []
    for i, present in enumerate(event_streams):
        hit = judged.get(present)
        if hit is None:
            hit = judged[present] = not streams.isdisjoint(present)
        if hit:
            held.append(i)
    return held


def as_ranges(indices: Sequence[int]) -> List[List[int]]:
    """Sorted indices as [start, stop, step] ranges, Python's `range` meaning:
    a detector at every 3rd event is one range, whatever the run's length."""
    ranges: List[List[int]] = []
    i = 0
    while i < len(indices):
        step = indices[i + 1] - indices[i] if i + 1 < len(indices) else 1
        j = i
        while j + 1 < len(indices) and indices[j + 1] - indices[j] == step:
            j += 1
        ranges.append([indices[i], indices[j] + step, step])
        i = j + 1
    return ranges


def holds(evt: Any, detector: str, interface: str = "raw") -> bool:
    """Whether psana's event has a record of the detector's interface."""
    return (detector, interface) in getattr(evt, "_det_segments", {})


def missing(detector: str, index: int) -> SourceError:
    return SourceError(NO_DATA, f"event {index} holds no data of {detector} (the detector "
                                f"is read out in other events only)")


def field_value(container: Any, field: FieldRef, evt: Any, index: int) -> Dict[str, Any]:
    """One field's value in the event (see `as_json`)."""
    iface = getattr(container, field.interface, None)
    call = getattr(iface, field.attribute, None) if iface is not None else None
    if not callable(call):
        raise SourceError(UNKNOWN_DETECTOR, f"field {field.name!r}: {field.detector} has no "
                                            f"{field.interface}.{field.attribute}")
    if not holds(evt, field.detector, field.interface):
        raise missing(field.detector, index)
    value = call(evt)
    if value is None:
        raise missing(field.detector, index)
    return as_json(field.name, value)


def as_json(name: str, value: Any) -> Dict[str, Any]:
    """A value as JSON, {dtype, shape, data}; numbers survive JSON exactly
    (floats are written with every digit)."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf" or array.size > MAX_FIELD_ELEMENTS:
        raise SourceError(NOT_AN_ARRAY, f"field {name!r} is {array.dtype} of shape "
                                        f"{array.shape}: only numbers and arrays of at most "
                                        f"{MAX_FIELD_ELEMENTS} numbers are served as fields")
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tolist()}


def epics_info(run: Any, timestamps: Sequence[int]) -> Optional[Dict[str, Any]]:
    """Run-level info on the run's EPICS PVs (None without any): their names,
    and the events from the first update on, which have values."""
    store = run.esm.stores[EPICS]
    variables = sorted(var for segments in store.env_variables.values()
                       for names in segments.values() for var in names)
    if not variables:
        return None
    first = min((int(ts) for manager in store.env_managers if manager.env_variables
                 for ts in manager.timestamps), default=None)
    held = [i for i, ts in enumerate(timestamps) if first is not None and ts >= first]
    return {"type": EPICS, "kind": EPICS, "interfaces": [], "modes": [], "variables": variables,
            "events": len(held), "present": as_ranges(held)}


def pv_value(run: Any, variable: str, evt: Any, index: int) -> Dict[str, Any]:
    """The PV's value at the event: that of its last update at or before the
    event. (Once a run's table is built, psana 4.3.4's own lookup holds every
    update of the run and answers with the first update at or after the event,
    i.e. a later value; read sequentially it answers this one.)"""
    for manager in run.esm.stores[EPICS].env_managers:
        where = manager.locate_variable(variable)
        if where is None:
            continue
        alg, segment = where
        last = int(np.searchsorted(manager.timestamps, evt.timestamp, side="right")) - 1
        for pos in range(last, -1, -1):
            records = getattr(manager.dgrams[pos], EPICS, None)
            record = records.get(segment) if records else None
            if record is not None and hasattr(record, alg):
                return as_json(f"{EPICS}.{variable}", getattr(getattr(record, alg), variable))
        raise missing(f"EPICS variable {variable}", index)
    raise SourceError(UNKNOWN_DETECTOR, f"the run has no EPICS variable {variable!r}")
