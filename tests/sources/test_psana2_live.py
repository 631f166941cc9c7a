"""A run our writer grows as the DAQ does is served while it is written, as psana's own live read gives it and byte-identical to the finished run, and its end is told."""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from conftest import ServerProcess
from live_helpers import LiveOracle, LiveWriter, server_args
from psana2_helpers import EXP, ROOT, assert_same, error_of, psana_python, run_psana
from psana_ipc.client import Client
from psana_ipc.client.follow import LiveEvent
from psana_ipc.protocol.errors import OUT_OF_RANGE, ServerError

pytestmark = pytest.mark.psana2

RUN, EVENTS, RATE, PAUSE_AT = 21, 8, 10, 3     # epix10k2M over 2 streams, and ebeam
CHUNKED_RUN, CHUNKED_EVENTS, CHUNK = 25, 7, 2
CALLS = ["epix10k2M.raw", "epix10k2M.calib"]
DETECTOR = "epix10k2M"
KINDS_RUN, KINDS_EVENTS = 24, 12
KINDS = ("--detectors", "hsd", "timing", "andor", "piranha4", "scan", "epics", "--steps", "3",
         "--rate", "andor=3:2")


@dataclass
class Grown:
    """What a server gave of the run while its writer was paused, then
    followed to its end; and psana's own reads, live and of the finished run."""
    paused: List[int]
    paused_info: dict
    frames: Dict[Tuple[int, str], np.ndarray]
    not_written: ServerError
    followed: List[LiveEvent]
    reason: str
    ended_info: dict
    report: str
    files: List[Path]
    live: Dict[str, np.ndarray]
    finished: Dict[str, np.ndarray]


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Grown:
    """The writer stops itself after PAUSE_AT events, and again before its
    EndRun: psana's live read and a server see the run live at those points
    whatever the machine's speed (psana 4.3.4's live read loses the events
    it has not built when the files are renamed during its one-second wait)."""
    root = tmp_path_factory.mktemp("live")
    data, calib = root / "xtc", root / "calib"
    writer = LiveWriter(data, RUN, EVENTS, RATE, "--detectors", DETECTOR, "ebeam",
                        "--panel-streams", "2", "--calib-dir", str(calib),
                        stop_after=(PAUSE_AT, EVENTS))
    paused = writer.stopped(PAUSE_AT)
    oracle = LiveOracle(data, calib, RUN, CALLS, root / "live.npz")
    server = ServerProcess(server_args(data, 2, calib), root, python=psana_python())
    try:
        oracle.wait_read(PAUSE_AT)
        with Client(server.address) as c:
            info = c.info(EXP, RUN)
            frames = {(event, mode): c.get(EXP, RUN, DETECTOR, event, mode=mode)
                      for event in reversed(paused) for mode in ("raw", "calib")}
            not_written = error_of(c.get, EXP, RUN, DETECTOR, info["run_events"], mode="raw")
            follower = c.follow(EXP, RUN, DETECTOR, "calib", timeout=60)
            events = iter(follower)
            writer.resume()
            followed = [next(events) for _ in range(EVENTS)]
            writer.stopped(EVENTS)
            oracle.wait_read(EVENTS)
            writer.resume()
            followed += list(events)
            ended_info = c.info(EXP, RUN)
        report = writer.finish()
    finally:
        writer.resume()
        stopped = server.stop()
    assert stopped == 0
    live = oracle.answers()
    finished = LiveOracle(data, calib, RUN, CALLS, root / "finished.npz").answers()
    return Grown(paused, info, frames, not_written, followed, follower.reason, ended_info,
                 report, writer.files(), live, finished)


def test_a_paused_run_is_live_and_its_written_events_are_the_finished_runs(grown):
    info = grown.paused_info
    assert info["live"] is True and info["ended"] == ""
    assert info["run_events"] == len(grown.paused) == PAUSE_AT
    assert info["detectors"][DETECTOR]["events"] == info["run_events"]
    for (event, mode), frame in grown.frames.items():
        assert_same(frame, grown.finished[f"{DETECTOR}.{mode}"][event])
    assert grown.not_written.code == OUT_OF_RANGE
    assert "not written yet" in grown.not_written.message


def test_a_follow_gets_every_event_once_in_order_as_psana_reads_it_live(grown):
    assert [e.event for e in grown.followed] == list(range(EVENTS))
    assert all(e.run == RUN and e.skipped == 0 for e in grown.followed)
    assert grown.followed[-1].lag == 0
    for reference in (grown.live, grown.finished):
        assert [e.timestamp["time"] for e in grown.followed] == reference["timestamps"].tolist()
        for e in grown.followed:
            assert_same(e.frame, reference[f"{DETECTOR}.calib"][e.event])
    assert "EndRun" in grown.reason
    assert (grown.ended_info["live"], grown.ended_info["ended"]) == (False, "end_run")
    assert grown.ended_info["run_events"] == EVENTS


def test_the_writer_renames_every_file_and_writes_the_small_data_smdwriter_makes(grown,
                                                                                tmp_path):
    assert re.search(r"wrote 8 events live: [\d.]+ Hz sustained \(asked 10 Hz\)", grown.report)
    assert not [path for path in grown.files if path.name.endswith(".inprogress")]
    for stream in ("s000", "s001", "s002"):
        written = next(p for p in grown.files if f"-{stream}-c000.smd" in p.name)
        made = smdwriter_output(sorted(p for p in grown.files
                                       if f"-{stream}-c" in p.name and "smd" not in p.name),
                                tmp_path / f"{stream}.smd.xtc2")
        assert_same_small_data(written.read_bytes(), made)


def test_a_chunked_run_is_followed_across_its_chunk_files_renames(tmp_path, start_server,
                                                                  live_writer):
    """The writer renames each chunk file when it moves on to the next: the
    server reads every event from its chunk under either name, while psana
    4.3.4's own live read opens a chunk the DAQ still writes by its final
    name and fails (FileNotFoundError); the reference is psana's read of the
    finished run."""
    data = tmp_path / "xtc"
    writer = live_writer(data, CHUNKED_RUN, CHUNKED_EVENTS, RATE, "--detectors", "cspad",
                        "ebeam", "--chunk-events", str(CHUNK), stop_after=[PAUSE_AT])
    writer.stopped(PAUSE_AT)
    names = sorted(path.name for path in data.glob("*-s000-c*"))
    assert names == [f"{EXP}-r{CHUNKED_RUN:04d}-s000-c000.xtc2",
                     f"{EXP}-r{CHUNKED_RUN:04d}-s000-c001.xtc2.inprogress"]
    server = start_server(server_args(data, 2), python=psana_python())
    with Client(server.address) as c:
        paused = {e: c.get(EXP, CHUNKED_RUN, "cspad", e, mode="raw") for e in range(PAUSE_AT)}
        follower = c.follow(EXP, CHUNKED_RUN, "cspad", "raw", timeout=60)
        writer.resume()
        followed = list(follower)
        again = {e: c.get(EXP, CHUNKED_RUN, "cspad", e, mode="raw") for e in range(PAUSE_AT)}
    writer.finish()
    assert len(list(data.glob("*-s000-c*.xtc2"))) == -(-CHUNKED_EVENTS // CHUNK)
    finished = LiveOracle(data, tmp_path, CHUNKED_RUN, ["cspad.raw"],
                          tmp_path / "finished.npz").answers()
    assert [e.event for e in followed] == list(range(CHUNKED_EVENTS))
    assert [e.timestamp["time"] for e in followed] == finished["timestamps"].tolist()
    for e in followed:
        assert_same(e.frame, finished["cspad.raw"][e.event])
    for event in range(PAUSE_AT):
        assert_same(paused[event], finished["cspad.raw"][event])
        assert_same(again[event], finished["cspad.raw"][event])


def smdwriter_output(chunks: List[Path], out: Path) -> bytes:
    """psana's smdwriter on a stream's chunk files, joined as our writer joins
    a finished run's (tests read that writer's own function)."""
    run_psana(["-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                     f"from pathlib import Path; import make_xtc2_run as m; "
                     f"m.write_smalldata([Path(p) for p in {[str(c) for c in chunks]!r}], "
                     f"Path({str(out)!r}), m.smdwriter())"])
    return out.read_bytes()


def assert_same_small_data(written: bytes, made: bytes) -> None:
    """Record for record the same, but for the bytes smdwriter leaves
    unwritten in the names it adds to Configure (they differ from one run of
    smdwriter to the next)."""
    from psana_ipc.server.sources.xtc2_record import record_size
    sizes = []
    for data in (written, made):
        offset, found = 0, []
        while offset < len(data):
            found.append(data[offset:offset + record_size(data, offset)])
            offset += len(found[-1])
        sizes.append(found)
    (config, *rest), (made_config, *made_rest) = sizes
    assert rest == made_rest
    assert len(config) == len(made_config)


def test_a_dead_writers_run_is_served_to_its_last_whole_event_and_a_follow_goes_on_to_the_next(
        tmp_path, start_server, live_writer):
    """The writer dies mid-run (no EndRun, nothing renamed, a record maybe
    half written), a new one writes the next run; a server started then
    serves the first run as it was left, and a follow ends the first run
    after the timeout and goes on to the next one."""
    data = tmp_path / "xtc"
    crashed = live_writer(data, RUN, 40, 40, "--detectors", "cspad", "ebeam", "timing",
                         stop_after=[5])
    crashed.stopped(5)
    served = len(crashed.kill())
    for small in (data / "smalldata").glob(f"*-r{RUN:04d}-*.inprogress"):
        with open(small, "ab") as out:             # as if it died within a record
            out.write(small.read_bytes()[-40:-10])
    live_writer(data, RUN + 1, 4, 0, "--detectors", "cspad", "ebeam", "timing").finish()
    server = start_server(server_args(data), python=psana_python())
    with Client(server.address) as c:
        info = c.info(EXP, RUN)
        assert (info["live"], info["ended"], info["run_events"]) == (True, "", served)
        follower = c.follow(EXP, RUN, "cspad", "raw", timeout=1.0, next_runs=True)
        followed = [(e.run, e.event, e.frame) for e in follower]
        assert c.info(EXP, RUN + 1)["ended"] == "finished"
    assert [(run, event) for run, event, _ in followed] == (
        [(RUN, e) for e in range(served)] + [(RUN + 1, e) for e in range(4)])
    for _, event, frame in followed:
        assert_same(frame, cspad_raw(event))
    assert "no later run" in follower.reason


def cspad_raw(event: int) -> np.ndarray:
    """psana's raw of our writer's cspad panel (see make_xtc2_run.field_value)."""
    values = (np.arange(185 * 388) + 5 * event) % 3000 - 1000
    return values.astype(np.int16).reshape(1, 185, 388)


def test_every_kind_grown_live_is_listed_and_chosen_as_when_finished(tmp_path, start_server,
                                                                     live_writer):
    """Mixed rates, steps, EPICS and scan values and event codes of a run
    opened while it grew are what a server opening the finished run says."""
    data = tmp_path / "xtc"
    writer = live_writer(data, KINDS_RUN, KINDS_EVENTS, 20, *KINDS, stop_after=[4])
    writer.stopped(4)
    grew = start_server(server_args(data), python=psana_python())
    with Client(grew.address) as c:
        assert c.info(EXP, KINDS_RUN)["live"] is True
        writer.resume()
        laser_on = [e.event for e in c.follow(EXP, KINDS_RUN, "piranha4", "raw", timeout=60,
                                              event_codes={"with": [40]})]
        writer.finish()
        grown_answers = kinds_answers(c)
    finished = start_server(server_args(data), python=psana_python())
    with Client(finished.address) as c:
        finished_answers = kinds_answers(c)
    assert laser_on == list(range(0, KINDS_EVENTS, 2))
    assert grown_answers["info"].pop("ended") == "end_run"
    assert finished_answers["info"].pop("ended") == "finished"
    assert grown_answers == finished_answers


def kinds_answers(c: Client) -> dict:
    info = c.info(EXP, KINDS_RUN, present=True)
    info.pop("idle")
    fields = ["scan.motor1", "scan.step_docstring", "step.index", "epics.HX2_DVD_GCC_01_PMON",
              "timing.pulseId", "sum(timing.pulseId)", "count(piranha4.raw)"]
    values = {}
    for event in c.events_with(EXP, KINDS_RUN, "andor"):
        _, found = c.get(EXP, KINDS_RUN, "andor", event, mode="raw", fields=fields)
        values[event] = {name: (v.dtype.str, v.tolist()) for name, v in found.items()}
    steps = [(step["index"], list(step["events"])) for step in c.steps(EXP, KINDS_RUN)]
    return {"info": info, "steps": steps,
            "codes": c.events_with(EXP, KINDS_RUN, "hsd", event_codes={"without": [40]}),
            "values": values}
