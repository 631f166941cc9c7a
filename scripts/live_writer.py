"""Writing a run as the DAQ writes it while it takes data, for
`make_xtc2_run.py --live RATE`.

The DAQ writes every stream event by event: the event's record goes to the
stream's chunk file, then its small-data record (where the record is) to
the stream's one small-data file. Both are named `<name>.inprogress`
while they are written; a chunk file is renamed to its final name when the
stream moves on to the next chunk, the small data and the last chunk when
the run ends (after EndRun). A reader therefore sees a run grow in whole
records, only ever finds an event's small data after its record, and finds
the files under one name or the other.

The small-data records are those psana's smdwriter makes from the finished
stream, byte for byte (a test compares the two): smdwriter copies
transitions, and writes for an L1Accept a fixed record holding the event's
offset and size in its chunk file. smdwriter itself is run twice per stream
(on its Configure, and on its Configure and first L1Accept) to learn those
two records; every other one is made from them.
"""
import os
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, List, Optional, Sequence, Tuple

from psana_ipc.server.sources.xtc2_record import RECORD_HEADER, record_size, service_of

INPROGRESS = ".inprogress"
CONFIGURE, L1ACCEPT = 2, 12          # psana's TransitionId
WHERE = struct.Struct("<QQ")         # an L1Accept's small data ends with its offset and size
REPORT_EVERY = 10.0                  # seconds between progress lines


@dataclass(frozen=True)
class Record:
    """One record of a stream, and the chunk file it goes to."""
    chunk: int
    data: bytes

    @property
    def service(self) -> int:
        return service_of(self.data)


def split_records(data: bytes) -> List[bytes]:
    """The records of an XTC2 file's bytes, in order."""
    records, offset = [], 0
    while offset < len(data):
        size = record_size(data, offset)
        records.append(data[offset:offset + size])
        offset += size
    return records


class SmallData:
    """One stream's small-data records, made as psana's smdwriter makes them."""

    def __init__(self, tool: str) -> None:
        self._tool = tool
        self._config: Optional[bytes] = None
        self._event: Optional[bytes] = None     # an L1Accept's small data, to fill in

    def smdwriter(self, records: Sequence[bytes]) -> List[bytes]:
        """What smdwriter makes of a stream holding `records`."""
        with tempfile.TemporaryDirectory(prefix="smd-") as scratch:
            stream, out = Path(scratch) / "stream.xtc2", Path(scratch) / "stream.smd.xtc2"
            stream.write_bytes(b"".join(records))
            subprocess.run([self._tool, "-f", str(stream), "-o", str(out)], check=True,
                           stdout=subprocess.DEVNULL)
            return split_records(out.read_bytes())

    def of(self, record: Record, offset: int) -> Optional[bytes]:
        """The small data of `record`, written at `offset` of its chunk file;
        None for a later chunk's Configure (the stream's small data holds one)."""
        if record.service == CONFIGURE:
            if self._config is not None:
                return None
            self._config = record.data
            return self.smdwriter([record.data])[0]
        if record.service != L1ACCEPT:
            return record.data
        if self._event is None:
            self._event = self.smdwriter([self._config, record.data])[1]
        made = bytearray(self._event)
        made[:RECORD_HEADER] = record.data[:RECORD_HEADER]
        WHERE.pack_into(made, len(made) - WHERE.size, offset, len(record.data))
        return bytes(made)


def chunk_path(path: Path, chunk: int) -> Path:
    """The stream's file for chunk `chunk`: ...-c000.xtc2 -> ...-c001.xtc2."""
    return path.with_name(path.name.replace("-c000.", f"-c{chunk:03d}."))


def create(path: Path) -> IO[bytes]:
    """A new file `path` + .inprogress, unbuffered; refused if the run's
    file exists under either name (a reader may be following it)."""
    try:
        if path.exists():
            raise FileExistsError
        return open(str(path) + INPROGRESS, "xb", buffering=0)
    except FileExistsError:
        raise SystemExit(f"{path} exists (or {path.name}{INPROGRESS}): a live run is written "
                         f"into new files only") from None


def finish(out: IO[bytes], path: Path) -> None:
    """Close a file and give it its final name."""
    out.close()
    os.rename(str(path) + INPROGRESS, path)


class LiveStream:
    """One stream's files while they are written."""

    def __init__(self, directory: Path, name: str, tool: str) -> None:
        self._first = directory / name
        self._small_path = directory / "smalldata" / name.replace(".xtc2", ".smd.xtc2")
        self._chunk = 0
        self._path = self._first
        self._out = create(self._path)
        self._small = create(self._small_path)
        self._made = SmallData(tool)
        self._offset = 0

    def write(self, record: Record) -> None:
        """The record into its chunk file, then its small data."""
        if record.chunk != self._chunk:
            finish(self._out, self._path)
            self._chunk = record.chunk
            self._path = chunk_path(self._first, record.chunk)
            self._out = create(self._path)
            self._offset = 0
        self._out.write(record.data)
        small = self._made.of(record, self._offset)
        if small is not None:
            self._small.write(small)
        self._offset += len(record.data)

    def finish(self) -> None:
        finish(self._out, self._path)
        finish(self._small, self._small_path)


def write_live(directory: Path, streams: Sequence[Tuple[str, Iterator[List[Record]]]],
               events: int, rate: float, tool: str, times: Optional[Path] = None,
               stop_after: Sequence[int] = ()) -> None:
    """Write the streams (each its chunk-0 name and its records, step by step:
    the run's header, then one step per event, then its end) event by event,
    event e at e / `rate` seconds (0: as fast as they can be written); each
    event's records are all written before the next event's. `times` gets a
    line `event time` (seconds since the epoch) once an event is written in
    every stream. For each N of `stop_after` the writer stops itself
    (SIGSTOP) once N events are written (N = events: before EndRun), as a
    paused DAQ, until SIGCONT; a pause shifts the times of the events after
    it. Prints the rate sustained, and the one writing allows."""
    live = [LiveStream(directory, name, tool) for name, _ in streams]
    log = open(times, "w", buffering=1) if times else None
    steps = zip(*(records for _, records in streams))
    start = reported = time.monotonic()     # event 0's time, once it is made
    busy = 0.0                     # seconds spent making and writing events
    written: List[float] = []      # when each event was written, monotonic
    for step in range(events + 2):
        event = step - 1
        began = time.monotonic()
        per_stream = next(steps)
        made = time.monotonic()
        if event == 0:
            start = made
        if rate and 0 <= event < events:
            time.sleep(max(0.0, start + event / rate - made))
        writing = time.monotonic()
        for stream, records in zip(live, per_stream):
            for record in records:
                stream.write(record)
        done = time.monotonic()
        if not 0 <= event < events:
            continue
        busy += made - began + done - writing
        written.append(done)
        if log is not None:
            log.write(f"{event} {time.time():.6f}\n")
        if event + 1 in stop_after:
            os.kill(os.getpid(), signal.SIGSTOP)
            paused = time.monotonic() - done
            start += paused
            written = [t + paused for t in written]
        if done - reported >= REPORT_EVERY:
            reported = done
            print(f"event {event + 1} of {events} written, "
                  f"{event / (done - written[0]):.1f} Hz", flush=True)
    for stream in live:
        stream.finish()
    if log is not None:
        log.close()
    span = written[-1] - written[0] if written else 0.0
    sustained = (len(written) - 1) / span if span else 0.0
    asked = f"{rate:g} Hz" if rate else "as fast as it could"
    print(f"wrote {events} events live: {sustained:.1f} Hz sustained (asked {asked}); "
          f"writing took {1e3 * busy / max(events, 1):.1f} ms an event, at most "
          f"{events / busy if busy else 0:.0f} Hz", flush=True)
