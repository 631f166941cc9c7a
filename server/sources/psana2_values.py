"""psana's per-event answers as arrays, and arrays as the JSON values that
travel beside a frame.

psana answers with numbers, strings, numpy arrays, lists, named tuples and,
for digitizers, dictionaries of channels. Each becomes one array, exactly:

    number, bool, string, list, array   np.asarray of it
    named tuple (ts's `info`)            a 0-d record (numpy structured array),
                                         one field per name: bool, int64 (uint64
                                         for integers past int64), float64, str
    channels {segment: {channel: array, "times": array}}
                                         (a digitizer's `waveforms`, `padded`):
                                         the channels stacked, (channels, samples),
                                         in (segment, channel) order; `times` is
                                         left out (psana makes it as sample
                                         index / 5.943 GHz)
    peaks {segment: {channel: (starts, peaks)}}
                                         (a digitizer's `peaks`): a table, one row
                                         per peak, int64:
                                         [segment, channel, start, length,
                                          sample 0, ..., sample length-1, 0, ...]
                                         rows padded with 0 to the longest peak

A field's value travels as {"dtype", "shape", "data"} (a record's dtype is the
list of its [name, type] pairs); numbers survive JSON exactly (floats are
written with every digit). A value of more than MAX_FIELD_ELEMENTS numbers
is refused (not_an_array): it is served as a frame by the same name.

A batch's values (`sum(...)`, `list(...)`, `count(...)`) are reduced here too.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.errors import NOT_AN_ARRAY

from .base import SourceError

MAX_FIELD_ELEMENTS = 16384      # a field's value travels as JSON: small arrays only
PEAK_COLUMNS = 4                # segment, channel, start, length
INT64_MAX = (1 << 63) - 1


def refused(name: str, why: str) -> SourceError:
    return SourceError(NOT_AN_ARRAY, f"{name}: {why}")


def to_array(name: str, attribute: str, value: Any) -> np.ndarray:
    """psana's answer (not None) as one array (see the module docstring)."""
    if isinstance(value, dict):
        return peaks_table(name, value) if attribute == "peaks" else channels(name, value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return record(name, value)
    try:
        array = np.asarray(value)
    except ValueError:
        array = np.asarray(None)
    if array.dtype.kind not in "biufU":
        raise refused(name, "psana's answer is not a number, a string or an array of them, "
                            "which this server cannot serve")
    return array


def sorted_channels(value: Dict[Any, Any]) -> List[Tuple[int, int, Any]]:
    """(segment, channel, data) of a digitizer's answer, in order."""
    found = []
    for segment, chans in value.items():
        if not isinstance(chans, dict):
            return []
        found += [(segment, chan, data) for chan, data in chans.items() if chan != "times"]
    return sorted(found, key=lambda c: (c[0], c[1]))


def channels(name: str, value: Dict[Any, Any]) -> np.ndarray:
    """The channels of a digitizer's answer stacked, (channels, samples)."""
    found = sorted_channels(value)
    arrays = [data for _, _, data in found if isinstance(data, np.ndarray)]
    if not arrays or len(arrays) < len(found) or any(a.ndim != 1 or a.dtype.kind not in "biuf"
                                                     for a in arrays):
        raise refused(name, f"psana answers with channels that are not one array each, which "
                            f"this server cannot serve (a digitizer's peaks are the field "
                            f"'{name.rpartition('.')[0]}.peaks')")
    if len({len(a) for a in arrays}) > 1:
        lengths = ", ".join(f"segment {segment} channel {chan}: {len(a)}"
                            for (segment, chan, _), a in zip(found, arrays))
        raise refused(name, f"its channels differ in length in this event ({lengths}), so "
                            f"they cannot be stacked")
    return np.stack(arrays)


def peaks_table(name: str, value: Dict[Any, Any]) -> np.ndarray:
    """A digitizer's peak lists as one table (see the module docstring)."""
    rows = []
    for segment, chan, data in sorted_channels(value):
        if not (isinstance(data, tuple) and len(data) == 2 and len(data[0]) == len(data[1])):
            raise refused(name, "psana's peaks are not (start positions, peaks) per channel")
        rows += [(segment, chan, int(start), np.asarray(peak))
                 for start, peak in zip(*data)]
    longest = max((len(peak) for *_, peak in rows), default=0)
    table = np.zeros((len(rows), PEAK_COLUMNS + longest), np.int64)
    for row, (segment, chan, start, peak) in zip(table, rows):
        row[:PEAK_COLUMNS] = segment, chan, start, len(peak)
        row[PEAK_COLUMNS:PEAK_COLUMNS + len(peak)] = peak
    return table


def record(name: str, value: Tuple[Any, ...]) -> np.ndarray:
    """A named tuple as a 0-d record."""
    types = []
    for field, item in zip(value._fields, value):
        if isinstance(item, (bool, np.bool_)):
            types.append((field, "?"))
        elif isinstance(item, (int, np.integer)):
            types.append((field, "<i8" if -INT64_MAX - 1 <= item <= INT64_MAX else "<u8"))
        elif isinstance(item, (float, np.floating)):
            types.append((field, "<f8"))
        elif isinstance(item, str):
            types.append((field, f"<U{max(len(item), 1)}"))
        else:
            raise refused(name, f"its member {field!r} is not a number or a string")
    return np.array(tuple(value), dtype=types)


def as_json(name: str, array: np.ndarray, frame_name: Optional[str]) -> Dict[str, Any]:
    """An array as a field's JSON value; `frame_name`: the detector name a
    value too large for a field can be asked for as a frame, if any."""
    if array.size > MAX_FIELD_ELEMENTS:
        instead = (f"ask for it as a frame, detector {frame_name!r}" if frame_name
                   else "it can only be read whole")
        raise refused(name, f"{array.size} numbers, more than the {MAX_FIELD_ELEMENTS} a "
                            f"field carries: {instead}")
    if array.dtype.names:
        dtype: Any = [[field, array.dtype.fields[field][0].str] for field in array.dtype.names]
        data = list(array.item())
    else:
        dtype, data = array.dtype.str, array.tolist()
    return {"dtype": dtype, "shape": list(array.shape), "data": data}


def reduced(name: str, how: str, values: Sequence[np.ndarray], sample: np.ndarray) -> np.ndarray:
    """A batch's values, those of the events that hold the field in order:
    their sum (accumulated in event order, integers as int64/uint64, floats in
    their own type), stacked (events first), or how many; `sample` gives the
    shape and type when the batch holds none."""
    if how == "count":
        return np.asarray(len(values), np.int64)
    if any(v.shape != sample.shape for v in values):
        raise refused(name, "its values differ in shape within the batch")
    if how == "list":
        return np.stack(values) if values else np.zeros((0,) + sample.shape, sample.dtype)
    if sample.dtype.kind not in "biuf":
        raise refused(name, "only numbers can be summed")
    total = np.zeros(sample.shape, accumulator(sample.dtype))
    for value in values:
        total += value
    return total


def accumulator(dtype: np.dtype) -> np.dtype:
    """The type a sum accumulates in: int64 for bools and signed integers,
    uint64 for unsigned ones, a float's own type."""
    if dtype.kind in "bi":
        return np.dtype(np.int64)
    if dtype.kind == "u":
        return np.dtype(np.uint64)
    return dtype
