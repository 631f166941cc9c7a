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

`--corrupt-event E` then damages event E's record in its big-data file: its
header claims 1 MiB more than the record holds (the small data still gives
the true size), so psana aborts parsing it ("corrupt xtc").

`--gain-bits` sets the two gain bits (raw | 0xc000) of every pixel, to check
that uncalibrated epix10k data is served with them masked.

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
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from psana.dgramedit import AlgDef, DetectorDef, DgramEdit
from psana.psexp import TransitionId

from psana_ipc.server.sources.synthetic import DETECTORS, expected, timestamp_of
from psana_ipc.server.sources.xtc2_record import RECORD_HEADER

# name -> psana detector type, version of its `raw` data (psana picks the class
# <type>_raw_<major>_<minor>_<micro>) and gain ranges its constants hold
PSANA_TYPES = {
    "epix10k2M": ("epix10ka", (2, 0, 1), 7),
    "jungfrau4M": ("jungfrau", (0, 2, 0), 3),
}
HEADROOM = 1 << 20
GAIN_BITS = 0xC000
EXTENT_AT = RECORD_HEADER + 8    # a record's size is RECORD_HEADER + its Xtc's extent
CORRUPTION = 1 << 20
# Panel pitch and detector distance of the epix10k2M test geometry, in micrometres.
PITCH_X, PITCH_Y, DISTANCE = 45000, 42000, 100000


def smdwriter() -> str:
    """psana's wheel installs its tools next to the package, not on PATH."""
    import psana
    beside = Path(psana.__file__).resolve().parents[1] / "bin" / "smdwriter"
    found = shutil.which("smdwriter") or (str(beside) if beside.exists() else None)
    if found is None:
        raise SystemExit("psana's smdwriter was not found; is this the psana environment?")
    return found


def declare(config: DgramEdit, detector: str, node: int) -> List:
    """Declare one segment per panel in the Configure record; epix10ka also
    needs its per-pixel gain configuration there for calib to work."""
    dettype, version, _ = PSANA_TYPES[detector]
    panels = DETECTORS[detector][0][0]
    segments = []
    for seg in range(panels):
        serial = DetectorDef(detector, dettype, f"{detector}-panel-{seg:02d}")
        segments.append(config.Detector(serial, AlgDef("raw", *version), {"raw": (np.uint16, 2)},
                                        nodeId=node, segment=seg))
        if dettype == "epix10ka":
            cfg = config.Detector(serial, AlgDef("config", *version),
                                  {"asicPixelConfig": (np.uint8, 3), "trbit": (np.uint8, 1)},
                                  nodeId=node, segment=seg)
            # pixel bits 12 with trbit set: fixed high gain, i.e. gain range 0
            cfg.config.asicPixelConfig = np.full((4, 176, 192), 12, np.uint8)
            cfg.config.trbit = np.ones(4, np.uint8)
            config.adddata(cfg.config)
    return segments


def chunk_path(path: Path, chunk: int) -> Path:
    """The stream's file for chunk `chunk`: ...-c000.xtc2 -> ...-c001.xtc2."""
    return path.with_name(path.name.replace("-c000.", f"-c{chunk:03d}."))


def write_stream(path: Path, detector: str, exp: str, run: int, events: int, node: int,
                 gain_bits: int, chunk_events: int = 0) -> List[Path]:
    """Configure, BeginRun (with exp/run), `events` L1Accepts, EndRun; split
    into chunk files of `chunk_events` events if it is not 0. Returns the
    files written, chunk 0 first."""
    shape = DETECTORS[detector][0]
    bufsize = int(np.prod(shape)) * 2 + HEADROOM
    buf = bytearray(bufsize)
    t0 = timestamp_of(0) - (1 << 32)
    config = DgramEdit(transition_id=TransitionId.Configure, ts=t0, bufsize=bufsize)
    runinfo = config.Detector(DetectorDef("runinfo", "runinfo", ""), AlgDef("runinfo", 0, 0, 1),
                              {"expt": (str, 1), "runnum": (np.uint32, 0)}, nodeId=node, segment=0)
    chunkinfo = config.Detector(DetectorDef("chunkinfo", "chunkinfo", ""),
                                AlgDef("chunkinfo", 0, 0, 1),
                                {"filename": (str, 1), "chunkid": (np.uint32, 0)},
                                nodeId=node, segment=0) if chunk_events else None
    segments = declare(config, detector, node)
    files = [path]

    def emit(dgram: DgramEdit) -> None:
        dgram.save(buf)
        out.write(buf[:dgram.size])

    def next_chunk(e: int) -> None:
        """Disable, then a new chunk file: Configure, Enable naming the file."""
        nonlocal out
        emit(DgramEdit(transition_id=TransitionId.Disable, config_dgramedit=config,
                       ts=timestamp_of(e) - 2, bufsize=bufsize))
        out.close()
        files.append(chunk_path(path, len(files)))
        out = open(files[-1], "wb")
        emit(config)
        enable = DgramEdit(transition_id=TransitionId.Enable, config_dgramedit=config,
                           ts=timestamp_of(e) - 1, bufsize=bufsize)
        chunkinfo.chunkinfo.filename = files[-1].name
        chunkinfo.chunkinfo.chunkid = len(files) - 1
        enable.adddata(chunkinfo.chunkinfo)
        emit(enable)

    out = open(path, "wb")
    try:
        emit(config)
        begin = DgramEdit(transition_id=TransitionId.BeginRun, config_dgramedit=config,
                          ts=t0 + 1, bufsize=bufsize)
        runinfo.runinfo.expt = exp
        runinfo.runinfo.runnum = run
        begin.adddata(runinfo.runinfo)
        emit(begin)
        for e in range(events):
            if chunk_events and e and e % chunk_events == 0:
                next_chunk(e)
            event = DgramEdit(transition_id=TransitionId.L1Accept, config_dgramedit=config,
                              ts=timestamp_of(e), bufsize=bufsize)
            raw = expected(detector, "raw", e) | np.uint16(gain_bits)
            for seg, names in enumerate(segments):
                names.raw.raw = raw[seg]
                event.adddata(names.raw)
            emit(event)
        emit(DgramEdit(transition_id=TransitionId.EndRun, config_dgramedit=config,
                       ts=timestamp_of(events), bufsize=bufsize))
    finally:
        out.close()
    return files


def record_sizes(data: bytes) -> List[int]:
    """The size of every record of an XTC2 file, in file order."""
    sizes, offset = [], 0
    while offset < len(data):
        extent, = struct.unpack_from("<I", data, offset + EXTENT_AT)
        sizes.append(RECORD_HEADER + extent)
        offset += sizes[-1]
    return sizes


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
            out.write(data if chunk == 0 else data[record_sizes(data)[0]:])


def corrupt_event(files: List[Path], event: int) -> Path:
    """Make L1Accept `event` (counted over the chunk files in order) claim
    CORRUPTION bytes more than it holds; returns the file changed."""
    seen = 0
    for path in files:
        data = bytearray(path.read_bytes())
        offset = 0
        for size in record_sizes(data):
            env, = struct.unpack_from("<I", data, offset + 8)
            if (env >> 24) & 0xF == TransitionId.L1Accept:
                if seen == event:
                    claimed = size - RECORD_HEADER + CORRUPTION
                    struct.pack_into("<I", data, offset + EXTENT_AT, claimed)
                    path.write_bytes(data)
                    return path
                seen += 1
            offset += size
    raise SystemExit(f"--corrupt-event {event}: the run has only {seen} events")


def epix10k2m_geometry() -> str:
    """psana geometry text placing 16 EPIX10KA:V1 panels on a 4x4 grid."""
    lines = ["# CALIB_TYPE geometry",
             "# test layout: 4x4 epix10ka panels, not a metrology",
             "# HDR PARENT IND OBJECT IND X0[um] Y0[um] Z0[um] ROT-Z ROT-Y ROT-X TILT-Z TILT-Y TILT-X"]
    for seg in range(16):
        row, col = divmod(seg, 4)
        x0, y0 = int((col - 1.5) * PITCH_X), int((1.5 - row) * PITCH_Y)
        lines.append(f"CAMERA 0 EPIX10KA:V1 {seg} {x0} {y0} 0 0 0 0 0.0 0.0 0.0")
    lines.append(f"IP 0 CAMERA 0 0 0 {DISTANCE} 0 0 0 0.0 0.0 0.0")
    return "\n".join(lines) + "\n"


def write_constants(folder: Path, detector: str, pedestal: float, gain: float,
                    bad_pixel_every: int = 0,
                    pixel_offset: Optional[float] = None) -> Dict[str, Path]:
    _, _, ranges = PSANA_TYPES[detector]
    shape = (ranges,) + DETECTORS[detector][0]
    folder.mkdir(parents=True, exist_ok=True)
    written = {"pedestals": folder / "pedestals.npy", "pixel_gain": folder / "pixel_gain.npy"}
    np.save(written["pedestals"], np.full(shape, pedestal, np.float32))
    np.save(written["pixel_gain"], np.full(shape, gain, np.float32))
    if bad_pixel_every:
        written["pixel_status"] = folder / "pixel_status.npy"
        bad = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:]) % bad_pixel_every == 0
        np.save(written["pixel_status"], np.broadcast_to(bad, shape).astype(np.uint64))
    if pixel_offset is not None and detector == "jungfrau4M":
        written["pixel_offset"] = folder / "pixel_offset.npy"
        np.save(written["pixel_offset"], np.full(shape, pixel_offset, np.float32))
    if detector == "epix10k2M":
        written["geometry"] = folder / "geometry.txt"
        written["geometry"].write_text(epix10k2m_geometry())
    return written


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", required=True, type=Path,
                        help="psana data directory to write (iserver --data-dir)")
    parser.add_argument("--exp", default="tstx00117", help="experiment name (default: %(default)s)")
    parser.add_argument("--run", type=int, default=1, help="run number (default: %(default)s)")
    parser.add_argument("-n", "--events", type=int, default=10,
                        help="events to write (default: %(default)s)")
    parser.add_argument("--detectors", nargs="+", choices=sorted(PSANA_TYPES),
                        default=sorted(PSANA_TYPES), help="detectors to write (default: all)")
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
    args = parser.parse_args(argv)

    (args.outdir / "smalldata").mkdir(parents=True, exist_ok=True)
    tool = smdwriter()
    for stream, detector in enumerate(args.detectors):
        base = f"{args.exp}-r{args.run:04d}-s{stream:03d}-c000"
        files = write_stream(args.outdir / f"{base}.xtc2", detector, args.exp, args.run,
                             args.events, stream + 1, args.gain_bits, args.chunk_events)
        write_smalldata(files, args.outdir / "smalldata" / f"{base}.smd.xtc2", tool)
        for path in files:
            print(f"{path}: {detector}")
        if args.corrupt_event is not None:
            print(f"{corrupt_event(files, args.corrupt_event)}: event {args.corrupt_event} corrupt")
        if args.calib_dir:
            folder = args.calib_dir / (f"{args.exp}/r{args.run:04d}" if args.per_run else "") / detector
            for ctype, path in write_constants(folder, detector, args.pedestal, args.gain,
                                               args.bad_pixel_every, args.pixel_offset).items():
                print(f"{path}: {ctype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
