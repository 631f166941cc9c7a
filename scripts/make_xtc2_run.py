#!/usr/bin/env python
"""Write a small psana2 XTC2 run offline with psana's own writer, for tests
and demos of `iserver --source psana2`. Run it with the psana environment:

    .venv-psana/bin/python scripts/make_xtc2_run.py --outdir DIR --exp tstx00117 --run 1 \\
        -n 10 --detectors epix10k2M jungfrau4M --calib-dir CDIR

Files written (what psana's `DataSource(exp=, run=, dir=DIR)` reads):

    DIR/<exp>-r<run:04d>-s<stream:03d>-c000.xtc2        one stream per detector,
                                                         one segment per panel
    DIR/smalldata/<exp>-r<run:04d>-s<stream:03d>-c000.smd.xtc2   (psana's smdwriter)

Event e of every detector holds the synthetic source's pattern, so one
reference function checks both sources:

    raw = (flat_pixel_index + 101 * e) % 16384    uint16 (panels, rows, cols)
    timestamp = (1700000000 + e // 1000) << 32 | (e % 1000) * 1000000

`--chunk-events N` splits each stream into chunk files of N events, as the
DAQ splits long runs: -c000, -c001, ... Every chunk file starts with the
Configure record (psana reads each chunk file on its own); chunk k > 0 then
holds an Enable record whose `chunkinfo` (filename, chunkid) names it, the
previous chunk ends with a Disable. The stream keeps one small-data file,
-c000.smd.xtc2, whose offsets point into the chunk file the last Enable
named: that is how psana finds the chunks (psana lists only -c000 files).

`--corrupt-event E` then damages event E's record in each stream holding it: its
header claims 1 MiB more than the record holds (the small data still gives
the true size), so psana aborts parsing it ("corrupt xtc").

`--gain-bits` sets the two gain bits (raw | 0xc000) of every pixel, to check
that uncalibrated epix10k data is served with them masked.

Beside the area detectors, `--detectors` accepts detectors shaped like the
DAQ's other kinds, each in a stream of its own after the area detectors':

    ebeam    EBeam BLD (ebeam_raw_2_0_0): ebeamPhotonEnergy, ebeamCharge (float64),
             damageMask (uint32), per event
    gasdet   gas detector BLD (gasdet_raw_1_0_0): f_11_ENRC, f_21_ENRC (float64)
    wave8    wave8 digitizer (wave8_raw_0_0_1): raw_0 .. raw_7, uint16 waveforms
             of 64 samples (psana's raw_all stacks them to (8, 64))
    cspad    a cspad panel as psana 4.3.4 reads LCLS-II cspad (cspad_raw_2_3_42):
             arrayRaw, int16 (185, 388); an area detector without a pixel mask
    epics    EPICS PVs HX2_DVD_GCC_01_PMON and XPP_VARS_FLOAT_02 (float64), in
             SlowUpdate transitions just before events 0, 2, 4, ... rather than
             in events; every stream of the run then gets those (empty)
             SlowUpdates too, as the DAQ sends transitions to every stream

    timing   the timing system (ts_raw_2_1_0): pulseId, timeStamp (uint64),
             ebeamDestn (uint8), inhibitCounts (uint32, 8) and sequenceValues
             (uint16, 18), whose bits are the event codes psana's `eventcodes`
             gives: 1 in every event, 40 in even events (laser on), 41 in odd
             ones (laser off), 280 in every 3rd (`EVENT_CODES`)
    andor    a 1-D camera as psana reads a pva andor (andor_raw_0_0_1):
             value, float64 (ANDOR_PIXELS,); with `--rate` an integrating detector
    piranha4 a line camera (piranha4_raw_2_1_0): image, uint16 (1, PIRANHA4_PIXELS)
    hsd      a two-channel digitizer (hsd_raw_2_0_0), one channel per segment,
             in the firmware's format psana parses: each event holds fex peaks
             (`hsd_peaks`), every HSD_RAW_EVERY-th event also the raw waveform
             (HSD_SAMPLES samples); its config gives psana's padding (ymin,
             ymax, gate_ns)
    scan     a step scan's variables motor1, step_value (float64) and
             step_docstring (str), in BeginStep transitions (needs --steps)

their values are plain functions of the event (or step) index (`field_value`).
`--rate DET=N[:FIRST]` writes DET only in events FIRST, FIRST+N, ... (default
every event), as a detector read out at a lower rate: its stream then has no
record at all for the other events, as the DAQ writes it.

`--steps N` splits the events into N steps: every stream gets a BeginStep
before a step's first event and an EndStep after its last, as psana's
`run.steps()` reads them; the scan detector's BeginSteps hold its variables.

`--panel-streams N` spreads each area detector's panels over N streams of
consecutive panels (the DAQ reads a large detector out through several
nodes, each writing a stream); psana joins the segments of every stream.

`--live RATE` writes the run as the DAQ does while it takes data
(live_writer.py): event by event at RATE Hz (0: as fast as it can), every
stream's record then its small data (byte for byte what smdwriter makes of
the finished stream), all files named `<name>.inprogress` and renamed when
done (a chunk file when the stream moves on, the rest after EndRun). It
refuses to write over an existing run, and ends with the rate it sustained
and the one its writing allows. `--times FILE` logs `event time` once each
event is written in every stream; `--stop-after N ...` stops it (SIGSTOP)
once N events are written (N = -n: before EndRun), as a paused DAQ, until
SIGCONT. Constants (`--calib-dir`) are written before the run begins.

`--calib-dir CDIR` writes offline constants in the layout the psana2 source
reads with `--calib-dir`:

    CDIR/<detector>/pedestals.npy    float32 (gain ranges, panels, rows, cols), all --pedestal
    CDIR/<detector>/pixel_gain.npy   float32, same shape, all --gain
    CDIR/epix10k2M/geometry.txt      psana geometry text: the 16 panels on a 4x4 grid
                                     (psana ships a jungfrau4M geometry, none for epix10k2M)

    CDIR/<detector>/pixel_status.npy   with --bad-pixel-every N: every Nth pixel of every
                                       gain range bad (status 1), the others good (0)
    CDIR/jungfrau4M/pixel_offset.npy   with --pixel-offset X: X for every pixel

With --per-run they go to CDIR/<exp>/r<run:04d>/<detector>/ instead, which
the source prefers for that run: runs with different constants side by side.
Without --gain-bits every pixel is in gain range 0, so calib = (raw - pedestal) / gain.
"""
import argparse
import functools
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
from psana.dgramedit import AlgDef, DetectorDef, DgramEdit
from psana.psexp import TransitionId

from psana_ipc.server.sources.synthetic import DETECTORS, expected, timestamp_of
from psana_ipc.server.sources.xtc2_record import RECORD_HEADER, record_size, service_of

from live_writer import Record, chunk_path, split_records, write_live
from xtc2_constants import PSANA_TYPES, write_constants
from xtc2_small_detectors import (EPICS_EVERY, FIELD_TYPES, TRANSITION_ONLY, declare_fields,
                                  declare_hsd, field_value, hsd_channel)

HEADROOM = 1 << 20
GAIN_BITS = 0xC000
EXTENT_AT = RECORD_HEADER + 8    # a record's size is RECORD_HEADER + its Xtc's extent
CORRUPTION = 1 << 20


def smdwriter() -> str:
    """psana's wheel installs its tools next to the package, not on PATH."""
    import psana
    beside = Path(psana.__file__).resolve().parents[1] / "bin" / "smdwriter"
    found = shutil.which("smdwriter") or (str(beside) if beside.exists() else None)
    if found is None:
        raise SystemExit("psana's smdwriter was not found; is this the psana environment?")
    return found


def declare(config: DgramEdit, detector: str, node: int, panels: Sequence[int]) -> List:
    """Declare one segment per panel of `panels` in the Configure record;
    epix10ka also needs its per-pixel gain configuration there for calib to
    work. Returns (panel, names) pairs."""
    dettype, version, _ = PSANA_TYPES[detector]
    segments = []
    for seg in panels:
        serial = DetectorDef(detector, dettype, f"{detector}-panel-{seg:02d}")
        segments.append((seg, config.Detector(serial, AlgDef("raw", *version),
                                              {"raw": (np.uint16, 2)}, nodeId=node, segment=seg)))
        if dettype == "epix10ka":
            cfg = config.Detector(serial, AlgDef("config", *version),
                                  {"asicPixelConfig": (np.uint8, 3), "trbit": (np.uint8, 1)},
                                  nodeId=node, segment=seg)
            # pixel bits 12 with trbit set: fixed high gain, i.e. gain range 0
            cfg.config.asicPixelConfig = np.full((4, 176, 192), 12, np.uint8)
            cfg.config.trbit = np.ones(4, np.uint8)
            config.adddata(cfg.config)
    return segments


def event_data(detector: str, segments: List, event: int, gain_bits: int) -> Iterator:
    """The filled `raw` containers of one event, one per segment."""
    if detector == "hsd":
        for seg, names in enumerate(segments):
            names.raw.eventHeader, names.raw.chan00 = hsd_channel(seg, event)
            yield names.raw
        return
    if detector in FIELD_TYPES:
        names = segments[0]
        for field in FIELD_TYPES[detector][2]:
            setattr(names.raw, field, field_value(detector, field, event))
        yield names.raw
        return
    raw = area_raw(detector, event, gain_bits)
    for seg, names in segments:
        names.raw.raw = raw[seg]
        yield names.raw


@functools.lru_cache(maxsize=1)
def area_raw(detector: str, event: int, gain_bits: int) -> np.ndarray:
    """An area detector's raw frame of an event, made once for all the
    streams its panels are spread over (the live writer makes them in turn)."""
    return expected(detector, "raw", event) | np.uint16(gain_bits)


def record_bytes(detector: str) -> int:
    """Bytes of one event's data beyond HEADROOM (which the small detectors fit in)."""
    if detector in FIELD_TYPES or detector == "hsd":
        return 0
    return int(np.prod(DETECTORS[detector][0])) * 2


def every_event(event: int) -> bool:
    return True


def parse_rate(text: str) -> Tuple[str, Callable[[int], bool]]:
    """DET=N[:FIRST] -> (DET, whether an event holds DET)."""
    try:
        detector, spec = text.split("=")
        every, _, first = spec.partition(":")
        every, first = int(every), int(first or 0)
        if every < 1 or first < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate {text!r}: expected DET=N[:FIRST], N >= 1")
    return detector, lambda e: e >= first and (e - first) % every == 0


@dataclass(frozen=True)
class Stream:
    """One stream of the run: its detector, its number, and for an area
    detector the panels it holds (the DAQ may read one detector out through
    several nodes, each writing a stream)."""
    detector: str
    index: int
    panels: Tuple[int, ...] = ()

    @property
    def node(self) -> int:
        return self.index + 1

    def name(self, exp: str, run: int, chunk: int = 0) -> str:
        """The DAQ's name of the stream's chunk file."""
        return f"{exp}-r{run:04d}-s{self.index:03d}-c{chunk:03d}.xtc2"


def stream_steps(stream: Stream, exp: str, run: int, events: int, gain_bits: int,
                 chunk_events: int = 0, present: Callable[[int], bool] = every_event,
                 slow_updates: Sequence[int] = (), steps: Sequence[int] = ()
                 ) -> Iterator[List[Record]]:
    """A stream's records, one list per step of writing: first Configure and
    BeginRun (with exp/run), then for each of the `events` the transitions
    before it and its L1Accept if `present` selects it, last EndRun, so
    every stream yields events + 2 lists. A SlowUpdate precedes each event
    listed in `slow_updates` (holding the PVs for epics, which has no
    L1Accepts); step k runs from event `steps[k]` on, between a BeginStep
    (holding the scan's variables for scan, which has no L1Accepts either)
    and an EndStep; with `chunk_events`, a new chunk file every that many
    events: a Disable, then in the new file Configure and an Enable naming it."""
    detector, node = stream.detector, stream.node
    bufsize = record_bytes(detector) + HEADROOM
    buf = bytearray(bufsize)
    t0 = timestamp_of(0) - (1 << 32)
    config = DgramEdit(transition_id=TransitionId.Configure, ts=t0, bufsize=bufsize)
    runinfo = config.Detector(DetectorDef("runinfo", "runinfo", ""), AlgDef("runinfo", 0, 0, 1),
                              {"expt": (str, 1), "runnum": (np.uint32, 0)}, nodeId=node, segment=0)
    chunkinfo = config.Detector(DetectorDef("chunkinfo", "chunkinfo", ""),
                                AlgDef("chunkinfo", 0, 0, 1),
                                {"filename": (str, 1), "chunkid": (np.uint32, 0)},
                                nodeId=node, segment=0) if chunk_events else None
    if detector == "hsd":
        segments = declare_hsd(config, detector, node)
    elif detector in FIELD_TYPES:
        segments = declare_fields(config, detector, node)
    else:
        segments = declare(config, detector, node, stream.panels)
    chunk = 0
    step: List[Record] = []

    def emit(dgram: DgramEdit) -> None:
        dgram.save(buf)
        step.append(Record(chunk, bytes(buf[:dgram.size])))

    def emit_transition(transition: int, ts: int, holder: str = "", index: int = 0) -> None:
        """A transition (or event); the stream of `holder` puts its data of
        event (or step) `index` in it."""
        dgram = DgramEdit(transition_id=transition, config_dgramedit=config, ts=ts,
                          bufsize=bufsize)
        if detector == holder:
            for data in event_data(detector, segments, index, gain_bits):
                dgram.adddata(data)
        emit(dgram)

    def next_chunk(e: int) -> None:
        nonlocal chunk
        emit_transition(TransitionId.Disable, timestamp_of(e) - 3)
        chunk += 1
        emit(config)
        enable = DgramEdit(transition_id=TransitionId.Enable, config_dgramedit=config,
                           ts=timestamp_of(e) - 2, bufsize=bufsize)
        chunkinfo.chunkinfo.filename = stream.name(exp, run, chunk)
        chunkinfo.chunkinfo.chunkid = chunk
        enable.adddata(chunkinfo.chunkinfo)
        emit(enable)

    emit(config)
    begin = DgramEdit(transition_id=TransitionId.BeginRun, config_dgramedit=config,
                      ts=t0 + 1, bufsize=bufsize)
    runinfo.runinfo.expt = exp
    runinfo.runinfo.runnum = run
    begin.adddata(runinfo.runinfo)
    emit(begin)
    for e in range(events):
        yield step
        step = []
        if e in steps:
            k = list(steps).index(e)
            if k:
                emit_transition(TransitionId.EndStep, timestamp_of(e) - 6)
            emit_transition(TransitionId.BeginStep, timestamp_of(e) - 5, "scan", k)
        if chunk_events and e and e % chunk_events == 0:
            next_chunk(e)
        if e in slow_updates:
            emit_transition(TransitionId.SlowUpdate, timestamp_of(e) - 1, "epics", e)
        if detector not in TRANSITION_ONLY and present(e):
            emit_transition(TransitionId.L1Accept, timestamp_of(e), detector, e)
    yield step
    step = []
    if steps:
        emit_transition(TransitionId.EndStep, timestamp_of(events) - 1)
    emit_transition(TransitionId.EndRun, timestamp_of(events))
    yield step


def plan_streams(detectors: Sequence[str], panel_streams: int) -> List[Stream]:
    """The run's streams: the area detectors', each spread over `panel_streams`
    streams of consecutive panels, then one per other detector."""
    area = [d for d in detectors if d in PSANA_TYPES]
    if area and not 1 <= panel_streams <= min(DETECTORS[d][0][0] for d in area):
        raise ValueError("--panel-streams: from 1 to the panels of the smallest area detector")
    planned: List[Tuple[str, Tuple[int, ...]]] = []
    for detector in area:
        panels = DETECTORS[detector][0][0]
        planned += [(detector, tuple(int(p) for p in share))
                    for share in np.array_split(np.arange(panels), panel_streams)]
    planned += [(detector, ()) for detector in detectors if detector not in area]
    return [Stream(detector, index, panels) for index, (detector, panels) in enumerate(planned)]


def write_stream(path: Path, records: Iterator[List[Record]]) -> List[Path]:
    """Write a stream's records into its chunk files (`path` is chunk 0's);
    returns the files written, chunk 0 first."""
    files = [path]
    out = open(path, "wb")
    try:
        for step in records:
            for record in step:
                if record.chunk == len(files):
                    out.close()
                    files.append(chunk_path(path, record.chunk))
                    out = open(files[-1], "wb")
                out.write(record.data)
    finally:
        out.close()
    return files


def write_smalldata(files: List[Path], smd: Path, tool: str) -> None:
    """psana's smdwriter on every chunk file, joined into the stream's one
    small-data file: chunk 0's whole, of the others all but the Configure
    record (the first), so that each chunk's offsets follow its Enable."""
    with open(smd, "wb") as out:
        for chunk, bigdata in enumerate(files):
            part = smd.with_name(smd.name + f".part{chunk}")
            subprocess.run([tool, "-f", str(bigdata), "-o", str(part)], check=True,
                           stdout=subprocess.DEVNULL)
            data = part.read_bytes()
            part.unlink()
            out.write(data if chunk == 0 else data[record_size(data):])


def corrupt_event(files: List[Path], event: int) -> Path:
    """Make L1Accept `event` (counted over the chunk files in order) claim
    CORRUPTION bytes more than it holds; returns the file changed."""
    seen = 0
    for path in files:
        data = bytearray(path.read_bytes())
        offset = 0
        for record in split_records(bytes(data)):
            if service_of(record) == TransitionId.L1Accept:
                if seen == event:
                    claimed = len(record) - RECORD_HEADER + CORRUPTION
                    struct.pack_into("<I", data, offset + EXTENT_AT, claimed)
                    path.write_bytes(data)
                    return path
                seen += 1
            offset += len(record)
    raise SystemExit(f"--corrupt-event {event}: the run has only {seen} events")


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", required=True, type=Path,
                        help="psana data directory to write (iserver --data-dir)")
    parser.add_argument("--exp", default="tstx00117", help="experiment name (default: %(default)s)")
    parser.add_argument("--run", type=int, default=1, help="run number (default: %(default)s)")
    parser.add_argument("-n", "--events", type=int, default=10,
                        help="events to write (default: %(default)s)")
    parser.add_argument("--detectors", nargs="+",
                        choices=sorted(PSANA_TYPES) + sorted(FIELD_TYPES) + ["hsd"],
                        default=sorted(PSANA_TYPES),
                        help="detectors to write (default: the area detectors)")
    parser.add_argument("--rate", type=parse_rate, action="append", default=[],
                        metavar="DET=N[:FIRST]",
                        help="write DET only in events FIRST, FIRST+N, ... (repeatable)")
    parser.add_argument("--steps", type=int, default=0, metavar="N",
                        help="split the events into N steps of a scan (default: no steps)")
    parser.add_argument("--chunk-events", type=int, default=0, metavar="N",
                        help="split each stream into chunk files of N events (default: one file)")
    parser.add_argument("--corrupt-event", type=int, metavar="E",
                        help="damage event E's big-data record so that psana aborts reading it")
    parser.add_argument("--gain-bits", action="store_const", const=GAIN_BITS, default=0,
                        help="set both gain bits of every pixel (raw | 0xc000)")
    parser.add_argument("--calib-dir", type=Path,
                        help="also write constants and geometry here (iserver --calib-dir)")
    parser.add_argument("--per-run", action="store_true",
                        help="write constants for this run only: CDIR/<exp>/r<run:04d>/<detector>/")
    parser.add_argument("--pedestal", type=float, default=10.0,
                        help="pedestal of every pixel (default: %(default)s)")
    parser.add_argument("--gain", type=float, default=2.0,
                        help="pixel gain of every pixel (default: %(default)s)")
    parser.add_argument("--bad-pixel-every", type=int, default=0, metavar="N",
                        help="also write pixel_status with every Nth pixel bad")
    parser.add_argument("--pixel-offset", type=float, metavar="X",
                        help="also write jungfrau4M's pixel_offset, X for every pixel")
    parser.add_argument("--panel-streams", type=int, default=1, metavar="N",
                        help="spread each area detector's panels over N streams (default: 1)")
    parser.add_argument("--live", type=float, metavar="RATE",
                        help="write the run as the DAQ does, event by event at RATE Hz (0: as "
                             "fast as it can), in .inprogress files renamed at its end")
    parser.add_argument("--times", type=Path, metavar="FILE",
                        help="with --live: a line 'event time' in FILE once each event is written")
    parser.add_argument("--stop-after", type=int, nargs="+", default=[], metavar="N",
                        help="with --live: stop (SIGSTOP) once N events are written (N = -n: "
                             "before EndRun), as a paused DAQ; SIGCONT goes on")
    args = parser.parse_args(argv)

    (args.outdir / "smalldata").mkdir(parents=True, exist_ok=True)
    tool = smdwriter()
    rates = dict(args.rate)
    unknown = set(rates) - set(args.detectors)
    if unknown:
        parser.error(f"--rate names detectors not written: {', '.join(sorted(unknown))}")
    if ("scan" in args.detectors) != bool(args.steps):
        parser.error("the scan detector and --steps go together")
    if args.steps > args.events:
        parser.error("--steps: more steps than events")
    if args.live is not None and (args.live < 0 or args.corrupt_event is not None):
        parser.error("--live takes a rate >= 0, and no --corrupt-event")
    if (args.times or args.stop_after) and args.live is None:
        parser.error("--times and --stop-after go with --live")
    try:
        streams = plan_streams(args.detectors, args.panel_streams)
    except ValueError as e:
        parser.error(str(e))
    if args.calib_dir:
        for detector in dict.fromkeys(d for d in args.detectors if d in PSANA_TYPES):
            folder = args.calib_dir / (f"{args.exp}/r{args.run:04d}" if args.per_run else "") / detector
            for ctype, path in write_constants(folder, detector, args.pedestal, args.gain,
                                               args.bad_pixel_every, args.pixel_offset).items():
                print(f"{path}: {ctype}")
    slow_updates = range(0, args.events, EPICS_EVERY) if "epics" in args.detectors else ()
    steps = [args.events * k // args.steps for k in range(args.steps)]
    records = [stream_steps(stream, args.exp, args.run, args.events, args.gain_bits,
                            args.chunk_events, rates.get(stream.detector, every_event),
                            slow_updates, steps) for stream in streams]
    names = [stream.name(args.exp, args.run) for stream in streams]
    if args.live is not None:
        write_live(args.outdir, list(zip(names, records)), args.events, args.live, tool,
                   args.times, args.stop_after)
        return 0
    for stream, name, stream_records in zip(streams, names, records):
        detector = stream.detector
        present = rates.get(detector, every_event)
        files = write_stream(args.outdir / name, stream_records)
        write_smalldata(files, args.outdir / "smalldata" / name.replace(".xtc2", ".smd.xtc2"),
                        tool)
        written = 0 if detector in TRANSITION_ONLY else sum(map(present, range(args.events)))
        chunks = f" (+{len(files) - 1} chunk files)" if len(files) > 1 else ""
        panels = f" panels {stream.panels[0]}-{stream.panels[-1]}" if args.panel_streams > 1 \
            and stream.panels else ""
        print(f"{files[0]}{chunks}: {detector}{panels}, {written} of {args.events} events")
        if (args.corrupt_event is not None and detector not in TRANSITION_ONLY
                and present(args.corrupt_event)):
            nth = sum(map(present, range(args.corrupt_event)))   # the stream's nth L1Accept
            print(f"{corrupt_event(files, nth)}: event {args.corrupt_event} corrupt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
