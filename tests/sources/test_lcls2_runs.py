"""Every detector of lcls2's own test runs equals psana's answer (separate process) or is refused."""
import re
from typing import Dict

import numpy as np
import pytest
from torch.utils.data import DataLoader

from psana2_helpers import (LCLS2_RUNS, Answers, assert_peaks, assert_same, error_of,
                            psana_channels, psana_python)
from psana_ipc.client import BatchLoader, Client, RunDataset
from psana_ipc.protocol.errors import NO_CALIBRATION, NO_DATA, NOT_AN_ARRAY, NOT_FOUND, ServerError
from psana_ipc.protocol.messages import FieldRef
from psana_ipc.server.sources.event_ranges import expand

pytestmark = pytest.mark.psana2

# What each run serves, as the server judges the class psana picks for each
# detector: detector -> (kind, modes, fields). psana 4.3.4 reads most of these
# runs' detectors with its test classes (hsd_raw_0_0_2, andor_raw_0_0_2, ...).
SERVED = {
    "mixed_rate": {
        "xpphsd": ("array", ["calib"], ["xpphsd.fex.calib", "xpphsd.calib"]),
        "xppcspad": ("area", ["raw", "calib", "image"],
                     ["xppcspad.calib", "xppcspad.image", "xppcspad.raw"]),
        "epicsinfo": ("scalar", [], [])},
    "multi-seg-epics": {"hsd": ("array", ["calib"], ["hsd.calib"]),
                        "andor": ("array", ["calib"], ["andor.calib"])},
    "fakesteps": {"hsd": ("array", ["calib"], ["hsd.calib"]),
                  "andor": ("array", ["calib"], ["andor.calib"])},
    "intg_det": {"hsd": ("array", ["calib"], ["hsd.calib"]),
                 "andor": ("array", ["calib"], ["andor.calib"]),
                 "epix": ("array", ["calib"], ["epix.calib"])},
    "test_hsd": {
        "xpphsd": ("digitizer", ["waveforms", "padded"],
                   ["xpphsd.hsd.padded", "xpphsd.hsd.peak_times", "xpphsd.hsd.peaks",
                    "xpphsd.hsd.waveforms"]),
        "xppts": ("scalar", [], ["xppts.ts.info", "xppts.ts.sequencer_info"])},
    "test_ts": {"xppts": ("scalar", [], ["xppts.ts.info", "xppts.ts.sequencer_info"])},
    "dgramedit-test": {"hsd": ("digitizer", ["waveforms", "padded"],
                               ["hsd.padded", "hsd.peak_times", "hsd.peaks", "hsd.waveforms"])},
}
VARIABLES = {"mixed_rate": {"epics": ["HX2:DVD:GCC:01:PMON", "HX2:DVD:GPI:01:PMON"],
                            "scan": ["motor1", "motor2"]},
             "multi-seg-epics": {"epics": ["background", "epicsvar1", "epicsvar2"],
                                 "scan": ["motor1", "motor2"]},
             "fakesteps": {"scan": ["motor1", "motor2"]}}
EVENTS = {"dgramedit-test": [0, 5, 9]}      # its waveforms are 130720 samples: a few events
# refused on purpose: (run, detector, mode) or (run, field) -> code
REFUSED = {("mixed_rate", "xppcspad", "image"): NO_CALIBRATION,     # no constants: btx's rule
           ("test_hsd", "xpphsd.hsd.peak_times"): NOT_AN_ARRAY,    # lists of arrays per channel
           ("dgramedit-test", "hsd.peak_times"): NOT_AN_ARRAY}
CARRIER = "step.index"         # a frame in every event of these runs, for fields to ride beside
PSEUDO = {"epics", "scan", "step"}
PYTHON_TYPES = re.compile(r"\b(NoneType|ndarray|dict|tuple|bytes)\b")


def calls(name: str):
    """(detector, interface, method) of every field of the run."""
    found = []
    for _, _, fields in SERVED[name].values():
        for field in fields:
            ref = FieldRef.parse(field)
            found.append([ref.detector, ref.interface, ref.attribute])
    return found


@pytest.fixture(scope="module")
def lcls2_answers(lcls2_runs, tmp_path_factory) -> Dict[str, Answers]:
    found = {}
    for name in SERVED:
        spec = {"events": EVENTS.get(name), "calls": calls(name), "steps": True,
                "env": [[store, var] for store, names in VARIABLES.get(name, {}).items()
                        for var in names],
                "intg_det": "andor" if name == "intg_det" else None}
        found[name] = lcls2_runs.oracle(name, spec, tmp_path_factory.mktemp(name))
    return found


@pytest.fixture(scope="module")
def lcls2_server(start_module_server, lcls2_runs):
    """One server over every run, for the module's tests (they only read)."""
    return start_module_server(lcls2_runs.server_args(), python=psana_python())


def main_interface(info: dict) -> str:
    return "raw" if "raw" in info["interfaces"] else info["interfaces"][0]


def check_frames(c: Client, name: str, det: str, info: dict, answers: Answers) -> None:
    """Every mode in every event: psana's answer, no_data where psana holds
    nothing (or gives nothing), or the refusal listed."""
    exp, run = LCLS2_RUNS[name]
    iface = main_interface(info)
    held = answers.found["held"][f"{det}.{iface}"]
    channels = c.info(exp, run, det).get("channels")
    for mode in info["modes"]:
        for event in answers.found["events"]:
            key = f"{det}.{iface}.{mode}/{event}"
            expected = psana_channels(answers, key, channels) if channels else answers.get(key)
            if event not in held or expected is None:
                assert error_of(c.get, exp, run, det, event, mode=mode).code == NO_DATA
            elif (name, det, mode) in REFUSED:
                error = error_of(c.get, exp, run, det, event, mode=mode)
                assert error.code == REFUSED[name, det, mode]
            else:
                assert_same(c.get(exp, run, det, event, mode=mode), expected)


def check_field(c: Client, name: str, field: str, event: int, answers: Answers,
                channels) -> None:
    exp, run = LCLS2_RUNS[name]
    ref = FieldRef.parse(field)
    key = f"{ref.detector}.{ref.interface}.{ref.attribute}/{event}"
    record = answers.found["records"].get(key)
    answered = answers.get(key) is not None or record is not None or answers.parts(key)
    held = event in answers.found["held"][f"{ref.detector}.{ref.interface}"]
    if (name, field) in REFUSED or not held or not answered:
        code = REFUSED.get((name, field), NO_DATA)
        error = error_of(c.get, exp, run, CARRIER, event, mode="raw", fields=[field])
        assert error.code == code and not PYTHON_TYPES.search(error.message)
        return
    try:
        value = c.get(exp, run, CARRIER, event, mode="raw", fields=[field])[1][field]
    except ServerError as e:           # too large for a field: a frame by the same name
        assert e.code == NOT_AN_ARRAY and f"detector {field!r}" in e.message
        value = c.get(exp, run, field, event, mode="raw")
    if record is not None:
        assert value.shape == () and list(value.dtype.names) == list(record)
        for member, expected in record.items():
            served = value[member].item()
            assert (type(served), served) == (type(expected), expected)
    elif ref.attribute == "peaks":
        assert_peaks(value, answers, key)
    elif answers.get(key) is None:
        assert_same(value, psana_channels(answers, key, channels))
    else:
        assert_same(value, answers.get(key))


def test_every_detector_of_lcls2s_runs_equals_psana_or_is_refused(lcls2_server, lcls2_answers):
    with Client(lcls2_server.address) as c:
        for name, served in SERVED.items():
            exp, run = LCLS2_RUNS[name]
            answers = lcls2_answers[name]
            found = c.info(exp, run, present=True)["detectors"]
            assert found["step"]["events"] == len(answers.found["timestamps"])
            assert sorted(set(found) - PSEUDO) == answers.found["detnames"]
            assert {det: (d["kind"], d["modes"], d["fields"]) for det, d in found.items()
                    if det not in PSEUDO} == served
            for store in ("epics", "scan"):
                assert found.get(store, {}).get("variables", []) == \
                    answers.found["variables"][store]
            for det, (kind, modes, fields) in served.items():
                if not modes:
                    error = error_of(c.get, exp, run, det, 0, mode="raw")
                    assert error.code == NOT_AN_ARRAY and not PYTHON_TYPES.search(error.message)
                    assert found[det]["note"] == error.message
                    instead = f"'{fields[0]}'" if fields else "'epics.<variable>'"
                    assert instead in error.message                   # what to ask for
                    continue
                iface = main_interface(found[det])
                asked = set(answers.found["events"])
                assert [e for e in expand(found[det]["present"]) if e in asked] == \
                    answers.found["held"][f"{det}.{iface}"]
                check_frames(c, name, det, found[det], answers)
            for det, (kind, _, fields) in served.items():
                channels = c.info(exp, run, det).get("channels") if kind == "digitizer" else None
                for field in fields:
                    for event in answers.found["events"]:
                        check_field(c, name, field, event, answers, channels)


def test_pvs_scan_variables_and_steps_are_psanas_in_order(lcls2_server, lcls2_answers):
    with Client(lcls2_server.address) as c:
        for name in SERVED:
            exp, run = LCLS2_RUNS[name]
            answers = lcls2_answers[name]
            steps = c.steps(exp, run)
            assert [list(step["events"]) for step in steps] == answers.found["steps"]
            for step in steps:
                for event in step["events"]:
                    assert c.get(exp, run, CARRIER, event, mode="raw") == step["index"]
            for store, names in VARIABLES.get(name, {}).items():
                for var in names:
                    field = f"{store}.{var}"
                    for event in answers.found["events"]:
                        reference = answers.get(f"{field}/{event}")
                        if reference is None:
                            error = error_of(c.get, exp, run, CARRIER, event, mode="raw",
                                             fields=[field])
                            assert error.code == NO_DATA
                            continue
                        _, values = c.get(exp, run, CARRIER, event, mode="raw", fields=[field])
                        assert_same(values[field], reference)
                    if store == "scan":     # a step's values: those while it runs
                        for step in steps:
                            assert_same(step["values"][var],
                                        answers.get(f"{field}/{step['events'][0]}"))
    assert lcls2_answers["fakesteps"].found["steps"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    string = lcls2_answers["mixed_rate"].get("epics.HX2:DVD:GPI:01:PMON/99")
    assert string.dtype.kind == "U" and str(string) == "Test String"


def intg_expected(answers: Answers, batch, field: str, how: str) -> np.ndarray:
    """psana's values over a batch, reduced as the server documents it."""
    ref = FieldRef.parse(field)
    values = [answers.get(f"{ref.detector}.{ref.interface}.{ref.attribute}/{e}") for e in batch]
    values = [v for v in values if v is not None]
    if how == "count":
        return np.asarray(len(values), np.int64)
    if how == "list":
        return np.stack(values) if values else np.zeros((0, 2, 2), np.float32)
    return np.add.reduce(np.stack(values), axis=0) if values else np.zeros((2, 2), np.float32)


def test_an_integrating_detector_gets_its_batch_summed_listed_and_counted_as_psana_groups_it(
        lcls2_server, lcls2_answers):
    answers = lcls2_answers["intg_det"]
    exp, run = LCLS2_RUNS["intg_det"]
    batches = answers.found["batches"]
    assert [b[-1] for b in batches] == [3, 6, 9, 12, 15] and answers.found["open"] == [16]
    names = [f"{how}({det}.calib)" for how in ("sum", "list", "count") for det in ("hsd", "epix")]
    with Client(lcls2_server.address) as c:
        for batch in batches:
            frame, values = c.get(exp, run, "andor", batch[-1], fields=names)
            assert_same(frame, answers.get(f"andor.raw.calib/{batch[-1]}"))
            for name in names:
                how = name.split("(")[0]
                assert_same(values[name], intg_expected(answers, batch, name[len(how) + 1:-1], how))
        assert error_of(c.get, exp, run, "andor", 16, fields=names).code == NO_DATA

    dataset = RunDataset(lcls2_server.address, exp, run, "andor", fields=names)
    assert dataset.requests_list == [(exp, run, "idx", "andor", b[-1]) for b in batches]
    rows = 0
    for frames, values in DataLoader(dataset, batch_size=2):
        for k in range(len(frames)):
            batch = batches[rows + k]
            counted = int(values["count(hsd.calib)"][k])
            assert counted == len(batch)          # lists padded to the longest: count says
            assert_same(values["list(hsd.calib)"][k][:counted].numpy(),
                        intg_expected(answers, batch, "hsd.calib", "list"))
            assert_same(values["sum(epix.calib)"][k].numpy(),
                        intg_expected(answers, batch, "epix.calib", "sum"))
        rows += len(frames)
    dataset.close()
    assert rows == len(batches)
    with BatchLoader(lcls2_server.address, exp, run, "andor", batch_size=5, output="numpy",
                     fields=names, connections=1) as loader:
        (frames, values), = list(loader)
    for k, batch in enumerate(batches):
        assert_same(values["sum(hsd.calib)"][k], intg_expected(answers, batch, "hsd.calib", "sum"))
        assert_same(values["count(epix.calib)"][k],
                    intg_expected(answers, batch, "epix.calib", "count"))


def test_a_file_psana_finds_no_run_in_is_refused_with_the_reason(lcls2_server):
    exp, run = LCLS2_RUNS["test_timetool"]
    with Client(lcls2_server.address) as c:
        for call in (lambda: c.info(exp, run), lambda: c.get(exp, run, "tmott", 0)):
            error = error_of(call)
            assert error.code == NOT_FOUND
            assert "psana finds no run in its files" in error.message
