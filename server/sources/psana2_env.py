"""What a run records beside its events: EPICS PVs, scan variables and steps.

psana keeps two stores of transitions, each a pseudo-detector here:

    epics   SlowUpdate transitions holding the EPICS PVs: fields
            `epics.<variable>`
    scan    BeginRun and BeginStep transitions holding a scan's variables
            (motor positions, the DAQ's `step_value` and `step_docstring`):
            fields `scan.<variable>`

A variable's value at an event is that of its last update at or before the
event, which is what psana answers when it reads the run in order (once a
run's table is built, psana 4.3.4's own lookup holds every update of the run
and answers with the first update at or after the event, i.e. a later value,
so the server looks it up itself).

    step    the run's steps (`run.steps()`: the events between a BeginStep
            and its EndStep), noted while the run's table is built: field
            `step.index`, the step an event belongs to (counted from 0)
"""
import bisect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_DATA, NOT_AN_ARRAY, UNKNOWN_DETECTOR

from .base import SourceError
from .event_ranges import as_ranges
from .psana2_values import as_json, to_array

EPICS, SCAN, STEP = "epics", "scan", "step"
STORES = (EPICS, SCAN)
STEP_INDEX = "index"
Steps = Sequence[Tuple[int, int, int]]      # per step: first event, stop, BeginStep time


def variables(run: Any, store: str) -> List[str]:
    found = run.esm.stores[store].env_variables
    return sorted({var for segments in found.values() for names in segments.values()
                   for var in names})


def first_update(run: Any, store: str) -> Optional[int]:
    """The time of the first transition holding data of the store."""
    return min((int(ts) for manager in run.esm.stores[store].env_managers
                if manager.env_variables
                for ts, dgram in zip(manager.timestamps, manager.dgrams)
                if hasattr(dgram, store)), default=None)


def store_info(run: Any, timestamps: Sequence[int], store: str) -> Optional[Dict[str, Any]]:
    """Run-level info on a store (None without variables): their names, and
    the events from the first update on, which have values."""
    names = variables(run, store)
    if not names:
        return None
    first = first_update(run, store)
    held = [i for i, ts in enumerate(timestamps) if first is not None and ts >= first]
    return {"type": store, "kind": store, "interfaces": [], "modes": [], "variables": names,
            "events": len(held), "present": as_ranges(held)}


def env_value(run: Any, store: str, variable: str, timestamp: int) -> Optional[Any]:
    """psana's value of the variable at `timestamp` (see the module docstring),
    None before its first update."""
    for manager in run.esm.stores[store].env_managers:
        where = manager.locate_variable(variable)
        if where is None:
            continue
        alg, segment = where
        last = int(np.searchsorted(manager.timestamps, timestamp, side="right")) - 1
        for pos in range(last, -1, -1):
            records = getattr(manager.dgrams[pos], store, None)
            data = records.get(segment) if records else None
            if data is not None and hasattr(data, alg):
                return getattr(getattr(data, alg), variable)
        return None
    raise SourceError(UNKNOWN_DETECTOR, f"the run has no {store} variable {variable!r}; it has "
                                        f"{', '.join(variables(run, store)) or 'none'}")


def pseudo_frames(name: str) -> SourceError:
    """Why `epics`, `scan` or `step` serves no frames, and what to ask for."""
    what = {EPICS: "the run's EPICS PVs", SCAN: "the run's scan variables",
            STEP: "the run's steps"}[name]
    fields = f"'{STEP}.{STEP_INDEX}'" if name == STEP else f"'{name}.<variable>'"
    return SourceError(NOT_AN_ARRAY, f"{name} is {what}, not a detector with frames: ask for "
                                     f"{fields} as a field beside a frame, or as a frame by "
                                     f"that name")


def no_update(store: str, variable: str, index: int) -> SourceError:
    return SourceError(NO_DATA, f"event {index} comes before the first update of {store} "
                                f"variable {variable}")


def step_of(steps: Steps, index: int) -> int:
    """The step event `index` belongs to; no_data outside every step."""
    at = bisect.bisect_right([first for first, _, _ in steps], index) - 1
    if at < 0 or index >= steps[at][1]:
        raise SourceError(NO_DATA, f"event {index} belongs to no step of the run")
    return at


def step_info(run: Any, steps: Steps) -> Optional[Dict[str, Any]]:
    """Run-level info on the steps (None without any): each step's events as
    [start, stop], and the scan variables' values at its BeginStep."""
    if not steps:
        return None
    names = variables(run, SCAN)
    values: List[Dict[str, Any]] = []
    for _, _, begun in steps:
        found = {name: env_value(run, SCAN, name, begun) for name in names}
        values.append({name: as_json(f"{SCAN}.{name}", to_array(name, name, value), None)
                       for name, value in found.items() if value is not None})
    held = [e for first, stop, _ in steps for e in range(first, stop)]
    return {"type": STEP, "kind": STEP, "interfaces": [], "modes": [],
            "fields": [f"{STEP}.{STEP_INDEX}"],
            "steps": [[first, stop] for first, stop, _ in steps], "values": values,
            "events": len(held), "present": as_ranges(held)}
