"""Field values as a reply carries them (JSON), turned back into exactly the
arrays psana returned, and batched: one array per name, events first."""
from typing import Any, Dict, Sequence

import numpy as np


def decode_value(value: Dict[str, Any]) -> np.ndarray:
    """One field's value as an array (0-d for a scalar), exactly what psana
    returned: numbers, strings, or a record (a named tuple's members, its
    dtype given as [name, type] pairs)."""
    if isinstance(value["dtype"], list):
        record = np.dtype([(name, kind) for name, kind in value["dtype"]])
        return np.array(tuple(value["data"]), dtype=record).reshape(value["shape"])
    return np.array(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])


def decode_values(values: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """A reply's field values as arrays (see `decode_value`)."""
    return {name: decode_value(v) for name, v in values.items()}


def padded_stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays stacked, events first; where their shapes differ (a digitizer's
    peaks, a batch's list), each is padded with zeros at the end of every
    axis to the largest (peak tables and `count(...)` say the true sizes)."""
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        return np.stack(arrays)
    largest = tuple(max(sizes) for sizes in zip(*shapes))
    out = np.zeros((len(arrays),) + largest, np.result_type(*arrays))
    for row, a in zip(out, arrays):
        row[tuple(slice(0, n) for n in a.shape)] = a
    return out


def stack_values(per_event: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Per-event field values batched: one array per name, events first."""
    if not per_event:
        return {}
    return {name: padded_stack([values[name] for values in per_event]) for name in per_event[0]}
