"""A psana2 run the DAQ is still writing, read as it grows.

psana 4.3.4 cannot serve a growing run by index: without `live=True` it
opens no `.inprogress` file (the server answers its file check itself, see
psana2_location), and with it `build_table()` sleeps at every end of data
until the run ends, and a second `build_table()` would restart the table
with only the new events. So the server reads a growing run's small data
itself and fills the run's EventTable as psana's `build_table()` would:

- each stream's small-data file is read on from where the last look
  stopped, whole records only: a record whose bytes are not all written
  yet is read again next time, and every record is checked (xtc2_record)
  before psana parses it;
- psana builds an event once every stream has passed it (a later record,
  or the stream's end), so does this: the slowest stream sets when an
  event appears, and an event appears with all its records;
- an event is an L1Accept; every other record is a transition, which
  updates psana's stores (EPICS PVs, scan values), chunks and steps, as
  during `build_table()`;
- a stream ends at its EndRun, or once its file has its final name (the
  writer is done with it; what it holds is read first). The run ends when
  every stream has: `ended` says why, END_RUN or RENAMED.

Nothing here waits: a look reads what is there and returns.
"""
import os
import time
from collections import deque
from itertools import groupby
from typing import Any, Deque, Dict, List, Optional, Tuple

from psana_ipc.protocol.errors import READ_FAILED

from .base import SourceError
from .growing_files import in_progress, open_either
from .psana2_chunks import EventTable
from .xtc2_record import RECORD_HEADER, XTC_HEADER, record_problem, record_size, service_of

BEGIN_RUN, END_RUN_ID, L1ACCEPT = 4, 5, 12     # psana's TransitionId
END_RUN, RENAMED = "end_run", "renamed"       # why a run ended
MAX_READ = 64 << 20                            # bytes of small data read per look and stream


class SmallDataStream:
    """One stream's small-data file as it grows: records read but not yet
    built into events (`pending`, as (time, dgram)), the time of the last
    one (`last`, None before BeginRun), and why it ended (`ended`)."""

    def __init__(self, path: str, config: Any) -> None:
        self.path = path
        self._fd = open_either(path)
        self._config = config
        self._offset = 0
        self.last: Optional[int] = None
        self.pending: Deque[Tuple[int, Any]] = deque()
        self.ended = ""

    def read(self) -> None:
        """Take in the whole records written since the last look."""
        renamed = not in_progress(self.path)     # looked at first: then all it holds is read
        size = os.fstat(self._fd).st_size
        while size > self._offset and not self.ended:
            buf = os.pread(self._fd, min(size - self._offset, MAX_READ), self._offset)
            used = self._take(buf)
            if not used:
                break
            self._offset += used
        if renamed and not self.ended:
            self.ended = RENAMED

    def _take(self, buf: bytes) -> int:
        """The bytes of whole records at the start of `buf`, taken in."""
        from psana import dgram
        used = 0
        while len(buf) - used >= RECORD_HEADER + XTC_HEADER and not self.ended:
            size = record_size(buf, used)
            if used + size > len(buf):
                break
            record = buf[used:used + size]
            problem = record_problem(record)
            if problem:
                raise SourceError(READ_FAILED, f"the small data {self.path} is corrupt at byte "
                                               f"{self._offset + used}: {problem}")
            used += size
            service = service_of(record)
            if self.last is None and service != BEGIN_RUN:
                continue               # Configure, and anything before BeginRun: psana read them
            d = dgram.Dgram(config=self._config, view=record)
            if self.last is not None:
                self.pending.append((d.timestamp(), d))
            self.last = d.timestamp()
            if service == END_RUN_ID:
                self.ended = END_RUN
        return used

    def mtime(self) -> float:
        return os.fstat(self._fd).st_mtime

    def close(self) -> None:
        os.close(self._fd)


class GrowingRun:
    """A run's EventTable, filled as the run's small data grows."""

    def __init__(self, run: Any, smalldata: List[str], table: EventTable) -> None:
        self._run = run
        self._table = table
        self._streams = [SmallDataStream(path, config)
                         for path, config in zip(smalldata, run.configs)]
        self.ended = ""

    def look(self) -> None:
        """Read what was written since the last look and build the events
        every stream has passed."""
        if self.ended:
            return
        for stream in self._streams:
            if not stream.ended:
                stream.read()
        self._build()
        if all(stream.ended for stream in self._streams):
            self.ended = END_RUN if all(s.ended == END_RUN for s in self._streams) else RENAMED

    def _build(self) -> None:
        going = [stream.last for stream in self._streams if not stream.ended]
        if None in going:
            return
        limit = min(going, default=None)
        ready = []
        for i, stream in enumerate(self._streams):
            while stream.pending and (limit is None or stream.pending[0][0] <= limit):
                ts, d = stream.pending.popleft()
                ready.append((ts, i, d))
        ready.sort(key=lambda item: item[:2])
        for ts, group in groupby(ready, key=lambda item: item[0]):
            dgrams: List[Any] = [None] * len(self._streams)
            for _, i, d in group:
                dgrams[i] = d
            first = next(d for d in dgrams if d is not None)
            if first.service() == L1ACCEPT:
                self._table.add(ts, offsets(dgrams))
            else:
                self._table.note(dgrams, len(self._table.timestamps))
                self._run._handle_transition(dgrams)

    def idle(self) -> float:
        """Seconds since the run's small data was last written."""
        return max(0.0, time.time() - max(stream.mtime() for stream in self._streams))

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


def offsets(dgrams: List[Any]) -> Dict[int, Tuple[int, int]]:
    """Per stream, (offset, size) of the event's record, from its small data."""
    return {i: (d.smdinfo[0].offsetAlg.intOffset, d.smdinfo[0].offsetAlg.intDgramSize)
            for i, d in enumerate(dgrams) if d is not None and hasattr(d, "smdinfo")}


def begun(smalldata: List[str]) -> bool:
    """Whether every stream's small data holds a whole BeginRun (psana needs
    its Configure and BeginRun to open the run, and fails on a part of one)."""
    for path in smalldata:
        fd = open_either(path)
        try:
            if not holds_begin_run(fd):
                return False
        finally:
            os.close(fd)
    return True


def holds_begin_run(fd: int) -> bool:
    offset, size = 0, os.fstat(fd).st_size
    while size - offset >= RECORD_HEADER + XTC_HEADER:
        head = os.pread(fd, RECORD_HEADER + XTC_HEADER, offset)
        offset += record_size(head)
        if offset > size:
            return False
        if service_of(head) == BEGIN_RUN:
            return True
    return False
