"""Runs shaped like DAQ output through `iserver --source psana2`: area
detectors, BLD scalars (EBeam, gas detector) and a wave8 digitizer at mixed
rates, written by psana's own writer. Every frame and value the server
returns is compared, byte for byte, with psana's own answer for the same
event made in a separate process (tests/psana2_values_oracle.py), or is the
documented error."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils.data import DataLoader

from psana2_helpers import (EXP, MIXED_EVENTS, MIXED_RUN, PVS, RUN, assert_same, error_of,
                            psana_python)
from psana_ipc.client import BatchLoader, Client, RunDataset
from psana_ipc.protocol.errors import (BAD_REQUEST, NO_DATA, NOT_AN_ARRAY, OUT_OF_RANGE,
                                       UNKNOWN_DETECTOR, UNKNOWN_MODE, ProtocolError)
from psana_ipc.server.sources.event_ranges import as_ranges

from conftest import in_pool

pytestmark = pytest.mark.psana2

FIELDS = ("ebeam.ebeamPhotonEnergy", "ebeam.ebeamCharge", "ebeam.damageMask",
          "gasdet.f_11_ENRC", "gasdet.f_21_ENRC", "wave8.raw_all", "wave8.raw_3",
          "epics.HX2_DVD_GCC_01_PMON", "epics.XPP_VARS_FLOAT_02")
# frames served per detector: (mode asked of the server, psana method it must equal)
FRAMES = (("epix10k2M", "calib", "calib"), ("epix10k2M", "raw", "raw"),
          ("jungfrau4M", "raw", "raw"), ("wave8", "raw", "raw_all"),
          ("cspad", "raw", "raw"), ("cspad", "calib", "calib"))


@pytest.fixture(scope="module")
def mixed_server(start_module_server, psana2_runs):
    """One server for the tests that only read (its worker keeps the run open)."""
    return start_module_server(psana2_runs.server_args(psana2_runs.calib_dir),
                               python=psana_python())


def psana_answer(oracle, detector: str, method: str, event: int):
    """psana's answer for det.raw.<method>(evt), or None where psana gives None."""
    return oracle.get(f"{detector}.raw.{method}/{event}")


def field_answer(oracle, name: str, event: int):
    if name.startswith("epics."):
        return oracle.get(f"{name}/{event}")
    return psana_answer(oracle, *name.split("."), event)


def held_by_psana(oracle, detector: str, method: str):
    return [e for e in range(MIXED_EVENTS) if psana_answer(oracle, detector, method, e) is not None]


def test_run_info_lists_every_detector_with_its_kind_modes_and_events(mixed_server,
                                                                     mixed_oracle):
    with Client(mixed_server.address) as c:
        found = c.info(EXP, MIXED_RUN, present=True)["detectors"]
        assert {name: (d["kind"], d["modes"]) for name, d in found.items()} == {
            "epix10k2M": ("area", ["raw", "calib", "image"]),
            "jungfrau4M": ("area", ["raw", "calib", "image"]),
            "ebeam": ("scalar", []), "gasdet": ("scalar", []), "wave8": ("waveform", ["raw"]),
            "cspad": ("area", ["raw", "calib", "image"]), "epics": ("epics", [])}
        assert found["epics"]["variables"] == sorted(PVS)
        for detector, method in (("epix10k2M", "raw"), ("jungfrau4M", "raw"), ("cspad", "raw"),
                                 ("wave8", "raw_all"), ("ebeam", "ebeamPhotonEnergy"),
                                 ("gasdet", "f_11_ENRC")):
            held = held_by_psana(mixed_oracle, detector, method)
            assert [e for r in found[detector]["present"] for e in range(*r)] == held
            assert found[detector]["events"] == len(held)
        assert found["wave8"]["present"] == [[1, 7, 3]]       # one range, not one per event
        assert "present" not in c.info(EXP, MIXED_RUN)["detectors"]["wave8"]

        info = c.info(EXP, MIXED_RUN, "jungfrau4M", present=True)
        assert (info["kind"], info["events"], info["run_events"]) == ("area", 3, MIXED_EVENTS)
        assert info["present"] == [[1, 7, 2]]
        # shapes come from an event that holds the detector (event 0 does not)
        assert info["modes"]["raw"] == {"shape": [8, 512, 1024], "dtype": "uint16",
                                        "calibrated": True}
        assert c.info(EXP, MIXED_RUN, "wave8")["modes"] == {
            "raw": {"shape": [8, 64], "dtype": "uint16", "calibrated": True}}
        assert c.info(EXP, MIXED_RUN, "ebeam")["modes"] == {}
        assert sorted(c.info(EXP, MIXED_RUN, "cspad")["modes"]) == ["calib", "raw"]
        assert c.info(EXP, RUN, "epix10k2M", present=True)["present"] == [[0, 12, 1]]


def test_frames_and_fields_equal_psanas_answers_or_no_data(mixed_server, mixed_oracle):
    with Client(mixed_server.address) as c:
        for event in range(MIXED_EVENTS):
            for detector, mode, method in FRAMES:
                reference = psana_answer(mixed_oracle, detector, method, event)
                if reference is None:
                    error = error_of(c.get, EXP, MIXED_RUN, detector, event, mode=mode)
                    assert error.code == NO_DATA
                    assert f"event {event} holds no data of {detector}" in error.message
                else:
                    assert_same(c.get(EXP, MIXED_RUN, detector, event, mode=mode), reference)
            for name in FIELDS:
                reference = field_answer(mixed_oracle, name, event)
                if reference is None:
                    error = error_of(c.get, EXP, MIXED_RUN, "epix10k2M", event, mode="raw",
                                     fields=[name])
                    assert error.code == NO_DATA
                    continue
                frame, values = c.get(EXP, MIXED_RUN, "epix10k2M", event, mode="raw",
                                      fields=[name, "ebeam.ebeamPhotonEnergy"])
                assert set(values) == {name, "ebeam.ebeamPhotonEnergy"}
                assert_same(values[name], reference)
                assert_same(frame, psana_answer(mixed_oracle, "epix10k2M", "raw", event))
    with Client(mixed_server.address, transport="inline") as c:     # values ride inline too
        frame, values = c.get(EXP, MIXED_RUN, "wave8", 4, mode="raw", fields=list(FIELDS))
        assert_same(frame, psana_answer(mixed_oracle, "wave8", "raw_all", 4))
        for name in FIELDS:
            assert_same(values[name], field_answer(mixed_oracle, name, 4))


def test_a_detector_without_frames_gets_a_coded_error_and_disturbs_no_other(mixed_server,
                                                                           mixed_oracle):
    with Client(mixed_server.address) as c:
        for detector in ("ebeam", "gasdet"):
            for mode in ("raw", "calib"):
                error = error_of(c.get, EXP, MIXED_RUN, detector, 0, mode=mode)
                assert error.code == NOT_AN_ARRAY and "scalar detector" in error.message
        assert error_of(c.get, EXP, MIXED_RUN, "epix10k2M", 0,
                        fields=["cspad.x"]).code == UNKNOWN_DETECTOR
        assert error_of(c.get, EXP, MIXED_RUN, "epix10k2M", 0,
                        fields=["ebeam.nosuch"]).code == UNKNOWN_DETECTOR
        assert error_of(c.get, EXP, MIXED_RUN, "epix10k2M", 0,
                        fields=["epics.NO_SUCH_PV"]).code == UNKNOWN_DETECTOR
        error = error_of(c.get, EXP, MIXED_RUN, "epix10k2M", 1, fields=["jungfrau4M.raw"])
        assert error.code == NOT_AN_ARRAY and "more than the 16384 a field carries" in error.message
        with pytest.raises(ProtocolError) as e:     # refused before it is sent
            c.get(EXP, MIXED_RUN, "epix10k2M", 0, fields=["epix10k2M.raw._mask"])
        assert e.value.code == BAD_REQUEST
        # psana's cspad class has no pixel mask: mask is not offered, the rest is served
        assert error_of(c.get, EXP, MIXED_RUN, "cspad", 0, mode="mask").code == UNKNOWN_MODE
        assert error_of(c.get, EXP, MIXED_RUN, "cspad", MIXED_EVENTS,
                        mode="raw").code == OUT_OF_RANGE
        assert_same(c.get(EXP, MIXED_RUN, "cspad", 3, mode="raw"),
                    psana_answer(mixed_oracle, "cspad", "raw", 3))
        assert_same(c.get(EXP, MIXED_RUN, "wave8", 4, mode="raw"),
                    psana_answer(mixed_oracle, "wave8", "raw_all", 4))
        assert_same(c.get(EXP, MIXED_RUN, "epix10k2M", 2),
                    psana_answer(mixed_oracle, "epix10k2M", "calib", 2))


def test_skip_incomplete_events_leaves_out_events_lacking_a_field(mixed_server, mixed_oracle):
    names = ["gasdet.f_11_ENRC", "wave8.raw_all"]
    complete = [e for e in range(MIXED_EVENTS)
                if all(field_answer(mixed_oracle, n, e) is not None for n in names)]
    assert complete == [4]
    with Client(mixed_server.address) as c:
        frames, values = c.get_many(EXP, MIXED_RUN, "epix10k2M", range(MIXED_EVENTS),
                                    mode="raw", fields=names, skip_incomplete=True)
        assert len(frames) == len(complete)
        for row, event in enumerate(complete):
            assert_same(frames[row], psana_answer(mixed_oracle, "epix10k2M", "raw", event))
            for name in names:
                assert_same(values[name][row], field_answer(mixed_oracle, name, event))
        assert error_of(c.get_many, EXP, MIXED_RUN, "epix10k2M", range(MIXED_EVENTS),
                        mode="raw", fields=names).code == NO_DATA


def test_loaders_default_to_the_events_holding_the_detector(mixed_server, mixed_oracle):
    address = mixed_server.address
    energy = "ebeam.ebeamPhotonEnergy"
    with BatchLoader(address, EXP, MIXED_RUN, "jungfrau4M", mode="raw", batch_size=2,
                     fields=[energy], connections=1) as loader:
        assert loader.events == held_by_psana(mixed_oracle, "jungfrau4M", "raw") == [1, 3, 5]
        got = []
        for frames, values in loader:
            assert in_pool(frames)              # fields do not keep a batch off the fast path
            got.append((frames.clone(), values))
    assert [len(frames) for frames, _ in got] == [2, 1]
    for (frames, values), events in zip(got, ([1, 3], [5])):
        assert isinstance(values[energy], torch.Tensor)
        for row, event in enumerate(events):
            assert_same(frames[row].numpy(), psana_answer(mixed_oracle, "jungfrau4M", "raw",
                                                          event))
            assert_same(values[energy][row].numpy(), field_answer(mixed_oracle, energy, event))
    with BatchLoader(address, EXP, MIXED_RUN, "jungfrau4M", mode="raw", output="numpy",
                     fields=["wave8.raw_all"], skip_incomplete=True, connections=1) as loader:
        assert loader.events == [1]
        (frames, values), = list(loader)
        assert_same(values["wave8.raw_all"][0], field_answer(mixed_oracle, "wave8.raw_all", 1))

    gas = "gasdet.f_11_ENRC"
    dataset = RunDataset(address, EXP, MIXED_RUN, "epix10k2M", mode="raw", fields=[gas],
                         skip_incomplete=True)
    events = held_by_psana(mixed_oracle, "gasdet", "f_11_ENRC")
    assert len(dataset) == len(events) == 3
    (frames, values), = list(DataLoader(dataset, batch_size=3))
    for row, event in enumerate(events):
        assert_same(frames[row].numpy(), psana_answer(mixed_oracle, "epix10k2M", "raw", event))
        assert_same(values[gas][row].numpy(), field_answer(mixed_oracle, gas, event))
    dataset.close()
    assert len(RunDataset(address, EXP, MIXED_RUN, "wave8", mode="raw")) == 2


def test_an_event_without_the_detector_is_refused_before_memory_is_reserved(start_server,
                                                                            psana2_runs):
    server = start_server(psana2_runs.server_args(psana2_runs.calib_dir) + ["--shm-budget", "1M"],
                          python=psana_python())
    with Client(server.address) as c:
        # a jungfrau4M frame (8 MiB) exceeds the budget: refused as absent, not as too large
        assert error_of(c.get, EXP, MIXED_RUN, "jungfrau4M", 0, mode="raw").code == NO_DATA
        frames, values = c.get_many(EXP, MIXED_RUN, "cspad", range(4), mode="raw",
                                    fields=["ebeam.ebeamCharge"], skip_incomplete=True)
        assert len(frames) == len(values["ebeam.ebeamCharge"]) == 2    # events 0 and 3
        assert c.stats()["frames_held"] == 0


def test_dataloader_workers_hand_fields_beside_a_batch_written_in_place(mixed_server, mixed_oracle):
    gas = "gasdet.f_11_ENRC"
    dataset = RunDataset(mixed_server.address, EXP, MIXED_RUN, "epix10k2M", mode="raw",
                         fields=[gas], skip_incomplete=True)
    events = held_by_psana(mixed_oracle, "gasdet", "f_11_ENRC")
    (frames, values), = list(DataLoader(dataset, batch_size=len(events), num_workers=1))
    assert in_pool(frames)          # written in place by the server, handed as is
    for row, event in enumerate(events):
        assert_same(frames[row].numpy(), psana_answer(mixed_oracle, "epix10k2M", "raw", event))
        assert_same(values[gas][row].numpy(), field_answer(mixed_oracle, gas, event))
    dataset.close()


@given(st.sets(st.integers(0, 300), max_size=60))
def test_present_ranges_expand_to_exactly_the_events(events):
    indices = sorted(events)
    ranges = as_ranges(indices)
    assert [e for r in ranges for e in range(*r)] == indices
    assert len(ranges) <= len(indices)
    every_third = list(range(2, 300, 3))
    assert as_ranges(every_third) == [[2, 302, 3]]


def test_a_cached_frame_carries_the_fields_its_own_request_asked_for(start_server, psana2_runs,
                                                                      mixed_oracle):
    server = start_server(psana2_runs.server_args(psana2_runs.calib_dir)
                          + ["--workers", "1", "--frame-cache", "64M"], python=psana_python())
    names = [n for n in FIELDS if field_answer(mixed_oracle, n, 0) is not None]
    with Client(server.address) as c:
        for name in names:        # the first get fills the cache, the others are hits
            frame, values = c.get(EXP, MIXED_RUN, "epix10k2M", 0, mode="raw", fields=[name])
            assert set(values) == {name}
            assert_same(values[name], field_answer(mixed_oracle, name, 0))
            assert_same(frame, psana_answer(mixed_oracle, "epix10k2M", "raw", 0))
        assert c.get(EXP, MIXED_RUN, "epix10k2M", 0, mode="raw").shape == frame.shape
        cache = c.stats()["frame_cache"]
    assert cache["hits"] >= len(names)
