"""Every type of value psana answers travels to JSON and back exactly, and values that vary in shape batch padded alike."""
import json
from collections import namedtuple

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from psana_ipc.client.field_values import decode_value, padded_stack
from psana_ipc.protocol.errors import NOT_AN_ARRAY, ProtocolError
from psana_ipc.server.sources.psana2_values import (MAX_FIELD_ELEMENTS, PEAK_COLUMNS, as_json,
                                                    reduced, to_array)

Info = namedtuple("Info", "pulseId timestamp ebeam_present rate name")
DTYPES = [np.dtype(t) for t in (np.bool_, np.uint8, np.int16, np.uint32, np.int64, np.uint64,
                                 np.float32, np.float64)]
numbers = st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(
    dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    elements=hnp.from_dtype(dtype, **({"allow_nan": False} if dtype.kind == "f" else {}))))


def travelled(name: str, value) -> np.ndarray:
    """psana's answer as the client decodes it, through JSON as the wire carries it."""
    return decode_value(json.loads(json.dumps(as_json(name, to_array(name, "v", value), name))))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@given(numbers)
def test_numbers_and_arrays_of_every_width_arrive_bit_for_bit(array):
    assert same(travelled("det.v", array), array)


C_STRINGS = st.text(st.characters(blacklist_characters="\x00"), max_size=30)   # as EPICS keeps them


@given(C_STRINGS, st.integers(0, 2**64 - 1), st.integers(-2**63, 2**63 - 1),
       st.booleans(), st.floats(allow_nan=False))
def test_strings_and_named_tuples_arrive_as_psana_gave_them(text, big, signed, flag, rate):
    assert travelled("epics.PV", text).item() == text
    record = travelled("ts.info", Info(big, signed, flag, rate, text))
    assert record.shape == () and record.dtype.names == Info._fields
    for member, value in zip(Info._fields, (big, signed, flag, rate, text)):
        assert (type(record[member].item()), record[member].item()) == (type(value), value)


def test_a_digitizers_channels_stack_and_its_peaks_make_a_table():
    waveforms = {1: {0: np.arange(4, dtype=np.uint16), "times": np.zeros(4)},
                 0: {0: np.arange(4, 8, dtype=np.uint16), "times": np.zeros(4)}}
    assert same(to_array("hsd.waveforms", "waveforms", waveforms),
                np.stack([np.arange(4, 8), np.arange(4)]).astype(np.uint16))
    peaks = {0: {0: ([8, 40], [np.array([5, 6, 7, 8], np.uint16), np.array([9] * 8, np.uint16)])},
             1: {0: ([4], [np.array([1, 2, 3, 4], np.uint16)])}}
    table = to_array("hsd.peaks", "peaks", peaks)
    assert table.dtype == np.int64 and table.shape == (3, PEAK_COLUMNS + 8)
    assert table.tolist() == [[0, 0, 8, 4, 5, 6, 7, 8, 0, 0, 0, 0],
                              [0, 0, 40, 8, 9, 9, 9, 9, 9, 9, 9, 9],
                              [1, 0, 4, 4, 1, 2, 3, 4, 0, 0, 0, 0]]
    assert to_array("hsd.peaks", "peaks", {0: {0: ([], [])}}).shape == (0, PEAK_COLUMNS)
    uneven = {0: {0: np.zeros(4, np.uint16)}, 1: {0: np.zeros(6, np.uint16)}}
    times = {0: {0: [np.zeros(4), np.zeros(2)]}}
    for name, value in (("hsd.waveforms", uneven), ("hsd.peak_times", times)):
        with pytest.raises(ProtocolError) as e:
            to_array(name, name.split(".")[1], value)
        assert e.value.code == NOT_AN_ARRAY and "dict" not in e.value.message


def test_values_too_large_or_of_no_array_type_are_refused_saying_what_to_do():
    with pytest.raises(ProtocolError) as e:
        as_json("hsd.waveforms", np.zeros(MAX_FIELD_ELEMENTS + 1), "hsd.waveforms")
    assert e.value.code == NOT_AN_ARRAY and "detector 'hsd.waveforms'" in e.value.message
    for value in ({1, 2}, object(), [np.zeros(2), np.zeros(3)], b"raw"):
        with pytest.raises(ProtocolError) as e:
            to_array("det.v", "v", value)
        assert e.value.code == NOT_AN_ARRAY
        assert not any(t in e.value.message for t in ("set", "object", "list", "bytes"))


@given(st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=2), min_size=1, max_size=6))
def test_values_of_varying_shape_are_padded_with_zeros_to_the_largest(shapes):
    arrays = [np.full(shape, k + 1, np.int64) for k, shape in enumerate(shapes)]
    stacked = padded_stack(arrays)
    assert stacked.shape == (len(arrays), max(s[0] for s in shapes), max(s[1] for s in shapes))
    for row, array in zip(stacked, arrays):
        rows, cols = array.shape
        assert (row[:rows, :cols] == array).all()
        assert row.sum() == array.sum()          # the rest is zeros


def test_a_batch_sums_in_event_order_lists_and_counts():
    values = [np.full(3, v, np.float32) for v in (1e8, 1.0, -1e8)]
    total = reduced("sum(f)", "sum", values, values[0])
    expected = np.zeros(3, np.float32)
    for v in values:
        expected += v
    assert same(total, expected)
    small = [np.array([250], np.uint8)] * 3
    assert same(reduced("sum(u)", "sum", small, small[0]), np.array([750], np.uint64))
    assert same(reduced("list(u)", "list", [], small[0]), np.zeros((0, 1), np.uint8))
    assert same(reduced("count(u)", "count", small, small[0]), np.asarray(3, np.int64))
    with pytest.raises(ProtocolError):
        reduced("sum(s)", "sum", [np.asarray("a")], np.asarray("a"))
