"""Each kind of LCLS-II data our writer makes is psana's answer through Client, RunDataset and BatchLoader."""
import numpy as np
import pytest
from torch.utils.data import DataLoader

from psana2_helpers import (EXP, KINDS_EVENTS, KINDS_RUN, KINDS_STEPS, RUN, SCAN_VARIABLES,
                            Answers, assert_peaks, assert_same, error_of, psana_channels,
                            psana_python)
from psana_ipc.client import BatchLoader, Client, RunDataset
from psana_ipc.protocol.errors import (BAD_REQUEST, NO_DATA, NOT_AN_ARRAY, OUT_OF_RANGE,
                                       UNKNOWN_DETECTOR, ProtocolError)

pytestmark = pytest.mark.psana2

CHANNELS = [[0, 0], [1, 0]]        # the writer's hsd: one channel in each of two segments
TIMING = ("timing.eventcodes", "timing.pulseId", "timing.timestamp", "timing.destination",
          "timing.inhibitCounts")
EVENTS = range(KINDS_EVENTS)


@pytest.fixture(scope="module")
def kinds_server(start_module_server, kinds_run):
    """One server for the tests that only read (its worker keeps the run open)."""
    return start_module_server(kinds_run.server_args(), python=psana_python())


def psana(answers: Answers, detector: str, method: str, event: int):
    return answers.get(f"{detector}.raw.{method}/{event}")


def codes_of(answers: Answers, event: int) -> set:
    return set(np.flatnonzero(psana(answers, "timing", "eventcodes", event)).tolist())


def test_digitizers_cameras_and_timing_are_listed_and_served_as_psana_gives_them(kinds_server,
                                                                                kinds_run):
    answers = kinds_run.answers
    with Client(kinds_server.address) as c:
        found = c.info(EXP, KINDS_RUN)["detectors"]
        assert {name: (d["kind"], d["modes"]) for name, d in found.items()} == {
            "hsd": ("digitizer", ["waveforms", "padded"]), "timing": ("timing", []),
            "andor": ("line", ["raw"]), "piranha4": ("line", ["raw", "calib"]),
            "epics": ("epics", []), "scan": ("scan", []), "step": ("step", [])}
        assert set(TIMING) <= set(found["timing"]["fields"])
        assert "timing.eventcodes" in found["timing"]["note"]
        info = c.info(EXP, KINDS_RUN, "hsd")
        assert info["channels"] == CHANNELS
        assert info["modes"]["waveforms"]["shape"] == [2, 64]
        for event in EVENTS:
            for mode in ("waveforms", "padded"):
                expected = psana_channels(answers, f"hsd.raw.{mode}/{event}", CHANNELS)
                if expected is None:      # raw waveforms in even events only
                    error = error_of(c.get, EXP, KINDS_RUN, "hsd", event, mode=mode)
                    assert error.code == NO_DATA and "holds no waveforms" in error.message
                else:
                    assert_same(c.get(EXP, KINDS_RUN, "hsd", event, mode=mode), expected)
            frame, values = c.get(EXP, KINDS_RUN, "piranha4", event, mode="raw",
                                  fields=["hsd.peaks", *TIMING])
            assert_same(frame, psana(answers, "piranha4", "raw", event))
            assert_peaks(values["hsd.peaks"], answers, f"hsd.raw.peaks/{event}")
            assert_peaks(c.get(EXP, KINDS_RUN, "hsd.peaks", event, mode="raw"), answers,
                         f"hsd.raw.peaks/{event}")          # a frame by the same name
            for name in TIMING:
                assert_same(values[name], psana(answers, "timing", name.split(".")[1], event))
            assert_same(c.get(EXP, KINDS_RUN, "piranha4", event, mode="calib"),
                        psana(answers, "piranha4", "calib", event))
            reference = psana(answers, "andor", "raw", event)
            if reference is None:
                assert error_of(c.get, EXP, KINDS_RUN, "andor", event, mode="raw").code == NO_DATA
            else:
                assert_same(c.get(EXP, KINDS_RUN, "andor", event, mode="raw"), reference)
        error = error_of(c.get, EXP, KINDS_RUN, "timing", 0, mode="raw")
        assert error.code == NOT_AN_ARRAY and "'timing.eventcodes'" in error.message
        assert error_of(c.get, EXP, KINDS_RUN, "piranha4", 0, mode="image").code == "unknown_mode"
        assert error_of(c.get, EXP, KINDS_RUN, "timing.nosuch", 0, mode="raw").code == \
            UNKNOWN_DETECTOR

    dataset = RunDataset(kinds_server.address, EXP, KINDS_RUN, "hsd", mode="padded",
                         fields=["timing.pulseId", "hsd.peaks"])
    (frames, values), = list(DataLoader(dataset, batch_size=KINDS_EVENTS, num_workers=1))
    dataset.close()
    for event in EVENTS:
        assert_same(frames[event].numpy(),
                    psana_channels(answers, f"hsd.raw.padded/{event}", CHANNELS))
        table = values["hsd.peaks"][event].numpy()      # padded to the batch's longest
        assert_peaks(table[table[:, 3] > 0], answers, f"hsd.raw.peaks/{event}")
        assert_same(values["timing.pulseId"][event].numpy(),
                    psana(answers, "timing", "pulseId", event))
    with BatchLoader(kinds_server.address, EXP, KINDS_RUN, "hsd", mode="waveforms",
                     batch_size=4, skip_incomplete=True, connections=1) as loader:
        rows = np.concatenate([frames.numpy() for frames in loader])
    waveforms = [psana_channels(answers, f"hsd.raw.waveforms/{e}", CHANNELS) for e in EVENTS]
    kept = [w for w in waveforms if w is not None]
    assert len(kept) == len(range(0, KINDS_EVENTS, 2))      # events without them are skipped
    assert_same(rows, np.stack(kept))


def test_event_codes_choose_the_events_of_every_loader(kinds_server, kinds_run, start_server,
                                                       psana2_runs):
    answers = kinds_run.answers
    laser_on = [e for e in EVENTS if 40 in codes_of(answers, e)]
    off_not_280 = [e for e in EVENTS if not codes_of(answers, e) & {40, 280}]
    assert laser_on == list(range(0, KINDS_EVENTS, 2)) and off_not_280 == [1, 5, 7, 11]
    with Client(kinds_server.address) as c:
        info = c.info(EXP, KINDS_RUN, "piranha4", present=True, event_codes={"with": [40]})
        assert info["events"] == len(laser_on)
        assert c.events_with(EXP, KINDS_RUN, "piranha4",
                             event_codes={"without": [40, 280]}) == off_not_280
        chosen = c.info(EXP, KINDS_RUN, event_codes={"with": [280, 1]})["detectors"]
        assert chosen["andor"]["events"] == len([e for e in (2, 5, 8, 11)
                                                 if {280, 1} <= codes_of(answers, e)])
        assert c.events_with(EXP, KINDS_RUN, "piranha4", event_codes={"with": [287]}) == []
        with pytest.raises(ProtocolError) as e:       # refused before it is sent
            c.events_with(EXP, KINDS_RUN, "piranha4", event_codes={"with": [40], "without": [40]})
        assert e.value.code == BAD_REQUEST
    dataset = RunDataset(kinds_server.address, EXP, KINDS_RUN, "piranha4", mode="raw",
                         event_codes={"with": [40]}, fields=["timing.eventcodes"])
    assert [r[4] for r in dataset.requests_list] == laser_on
    (frames, values), = list(DataLoader(dataset, batch_size=KINDS_EVENTS))
    dataset.close()
    assert values["timing.eventcodes"][:, 40].tolist() == [1] * len(laser_on)
    for row, event in enumerate(laser_on):
        assert_same(frames[row].numpy(), psana(answers, "piranha4", "raw", event))
    with BatchLoader(kinds_server.address, EXP, KINDS_RUN, "piranha4", mode="raw", batch_size=8,
                     events=range(6), event_codes={"without": [40, 280]}, connections=1,
                     output="numpy") as loader:
        assert loader.events == [e for e in off_not_280 if e < 6]
        batches = list(loader)
    assert_same(np.concatenate(batches), np.stack([psana(answers, "piranha4", "raw", e)
                                                   for e in loader.events]))
    other = start_server(psana2_runs.server_args(), python=psana_python())
    with Client(other.address) as c:        # a run without a timing detector
        error = error_of(c.events_with, EXP, RUN, "epix10k2M", event_codes={"with": [40]})
        assert error.code == UNKNOWN_DETECTOR and "no timing detector" in error.message


def test_steps_iterate_one_at_a_time_with_psanas_scan_values(kinds_server, kinds_run):
    answers = kinds_run.answers
    steps = answers.found["steps"]
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    fields = ["step.index"] + [f"scan.{var}" for var in SCAN_VARIABLES]
    with Client(kinds_server.address) as c:
        served = c.steps(EXP, KINDS_RUN)
        assert [list(step["events"]) for step in served] == steps
        for step in served:
            for var in SCAN_VARIABLES:
                assert_same(step["values"][var],
                            answers.get(f"scan.{var}/{step['events'][0]}"))
        assert error_of(c.events_with, EXP, KINDS_RUN, "hsd", step=KINDS_STEPS).code == \
            OUT_OF_RANGE
    for k, events in enumerate(steps):
        dataset = RunDataset(kinds_server.address, EXP, KINDS_RUN, "piranha4", mode="raw",
                             step=k, fields=fields)
        (frames, values), = list(DataLoader(dataset, batch_size=len(events)))
        dataset.close()
        assert values["step.index"].tolist() == [k] * len(events)
        for row, event in enumerate(events):
            assert_same(frames[row].numpy(), psana(answers, "piranha4", "raw", event))
            assert_same(values["scan.motor1"][row].numpy(), answers.get(f"scan.motor1/{event}"))
            assert values["scan.step_docstring"][row] == \
                str(answers.get(f"scan.step_docstring/{event}"))      # strings: a list of str
    with BatchLoader(kinds_server.address, EXP, KINDS_RUN, "hsd", mode="padded", step=1,
                     fields=fields, batch_size=8, connections=1) as loader:
        (frames, values), = list(loader)
    assert loader.events == steps[1]
    assert values["step.index"].tolist() == [1] * len(steps[1])
    assert values["scan.step_docstring"].dtype.kind == "U"          # numpy, not a tensor
    assert values["scan.step_docstring"].tolist() == \
        [str(answers.get(f"scan.step_docstring/{e}")) for e in steps[1]]


def test_the_integrating_camera_gets_the_fast_detectors_of_its_batch(kinds_server, kinds_run):
    answers = kinds_run.answers
    batches = answers.found["batches"]
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    names = ["sum(piranha4.raw)", "count(hsd.waveforms)", "list(timing.pulseId)",
             "sum(hsd.waveforms)"]
    with BatchLoader(kinds_server.address, EXP, KINDS_RUN, "andor", mode="raw", batch_size=4,
                     fields=names, connections=1, output="numpy") as loader:
        (frames, values), = list(loader)
    for row, batch in enumerate(batches):
        assert_same(frames[row], psana(answers, "andor", "raw", batch[-1]))
        assert_same(values["sum(piranha4.raw)"][row],
                    np.add.reduce(np.stack([psana(answers, "piranha4", "raw", e)
                                            for e in batch]).astype(np.uint64), axis=0))
        waveforms = [psana_channels(answers, f"hsd.raw.waveforms/{e}", CHANNELS) for e in batch]
        waveforms = [w for w in waveforms if w is not None]
        assert values["count(hsd.waveforms)"][row] == len(waveforms)
        assert_same(values["sum(hsd.waveforms)"][row],
                    np.add.reduce(np.stack(waveforms).astype(np.uint64), axis=0))
        assert_same(values["list(timing.pulseId)"][row],
                    np.stack([psana(answers, "timing", "pulseId", e) for e in batch]))
    with Client(kinds_server.address) as c:
        error = error_of(c.get, EXP, KINDS_RUN, "andor", 5, mode="raw",
                         fields=["sum(scan.step_docstring)"])
        assert error.code == NOT_AN_ARRAY and "only numbers can be summed" in error.message
        error = error_of(c.get, EXP, KINDS_RUN, "sum(hsd.waveforms)", 5, mode="raw")
        assert error.code == BAD_REQUEST
