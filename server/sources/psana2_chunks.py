"""Random access by event index that is right across chunk files, and never
lets psana parse a corrupt record.

The DAQ splits each stream of a long run into chunk files,
`<exp>-r<run>-s<stream>-c000.xtc2`, `-c001`, ... A stream keeps one
small-data file, `smalldata/<exp>-r<run>-s<stream>-c000.smd.xtc2`: each
event there holds the (offset, size) of the event's record in the current
chunk file, and an Enable record carrying `chunkinfo` (filename, chunkid)
switches to the chunk file it names. psana lists only the -c000 files and
follows the Enable records as it reads in order.

psana 4.3.4's `run.build_table()` follows them too but keeps only (offset,
size) per event, and `run.event(ts)` then reads every event from the file
the scan ended in, the last chunk: events of earlier chunks come out wrong,
or psana aborts on the bytes it finds there. `EventTable` notes, during
the same scan, at which event each stream changed chunk, and reads each
event from its own chunk file (under whichever name it has: a chunk file
the DAQ still writes is `.inprogress`, see growing_files). Every record is
checked (xtc2_record) before psana parses it, so a corrupt one is an error
reply, not a dead worker.

The same scan notes where the run's steps begin and end (BeginStep and
EndStep transitions), which `run.steps()` would find reading in order.
"""
import bisect
import os
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from psana_ipc.protocol.errors import READ_FAILED

from .base import SourceError
from .growing_files import open_either
from .xtc2_record import record_problem

ENABLE, BEGIN_STEP, END_STEP = 8, 6, 7   # psana's TransitionId


def chunk_named(dgram: Any) -> Optional[str]:
    """The file name an Enable record's chunkinfo gives, if it has one."""
    if dgram is None or dgram.service() != ENABLE or not hasattr(dgram, "chunkinfo"):
        return None
    for segment in dgram.chunkinfo.values():
        return segment.chunkinfo.filename
    return None


def first_record(dgrams: List[Any]) -> Any:
    return next((d for d in dgrams if d is not None), None)


class EventTable:
    """Every event's timestamp, and for each stream its chunk file, offset and
    size; the run's steps as (first event, stop, BeginStep time). Filled in
    file order, by psana's scan of a finished run (`scanned`) or as a
    growing run is read (psana2_live): events with `add`, the transitions
    between them with `note`."""

    def __init__(self, run: Any, first: List[str]) -> None:
        """`first`: each stream's chunk-0 file (by its final name)."""
        self._run = run
        # stream -> (first event index of each chunk, that chunk's file)
        self._chunks: Dict[int, Tuple[List[int], List[str]]] = {
            i: ([0], [path]) for i, path in enumerate(first)}
        self._fds: Dict[str, int] = {}
        self.timestamps: List[int] = []
        self._offsets: Dict[int, Dict[int, Tuple[int, int]]] = {}
        self._steps: List[Tuple[int, int, int]] = []
        self._begun: List[Tuple[int, int]] = []

    def add(self, ts: int, offsets: Dict[int, Tuple[int, int]]) -> None:
        """The next event: its timestamp, and per stream (offset, size) of its record."""
        self.timestamps.append(ts)
        self._offsets[ts] = offsets

    def note(self, dgrams: List[Any], events: int) -> None:
        """A transition after the run's first `events` events: a stream's next
        chunk file (an Enable naming it), a step's beginning or end."""
        for i, d in enumerate(dgrams):
            name = chunk_named(d)
            if name is not None:
                starts, files = self._chunks[i]
                starts.append(events)
                files.append(os.path.join(os.path.dirname(files[0]), name))
        record = first_record(dgrams)
        service = record.service() if record is not None else None
        if service == BEGIN_STEP:
            self._begun.append((events, int(record.timestamp())))
        elif service == END_STEP and self._begun:
            start, when = self._begun.pop()
            self._steps.append((start, events, when))

    @property
    def steps(self) -> List[Tuple[int, int, int]]:
        """The steps so far; one not ended yet runs to the last event."""
        return self._steps + [(start, len(self.timestamps), when) for start, when in self._begun]

    def event_streams(self, start: int = 0) -> List[FrozenSet[int]]:
        """Per event from `start` on, the streams holding a record of it; a
        stream's index is its place in `run.configs`."""
        return [frozenset(self._offsets[ts]) for ts in self.timestamps[start:]]

    def chunk_file(self, stream: int, index: int) -> str:
        starts, files = self._chunks[stream]
        return files[bisect.bisect_right(starts, index) - 1]

    def event(self, index: int, streams: Optional[Set[int]] = None) -> Any:
        """psana's event `index`, read as `run.event(ts)` reads it but from
        each stream's own chunk file; only `streams`' records if given."""
        from psana import dgram
        from psana.event import Event
        dgrams: List[Any] = [None] * len(self._run.configs)
        for stream, (offset, size) in self._offsets[self.timestamps[index]].items():
            if streams is not None and stream not in streams:
                continue
            path = self.chunk_file(stream, index)
            if path not in self._fds:
                self._fds[path] = open_either(path)
            buf = os.pread(self._fds[path], size, offset)
            problem = record_problem(buf)
            if problem:
                raise SourceError(READ_FAILED, f"event {index}: the record at byte {offset} of "
                                               f"{path} is corrupt: {problem}")
            dgrams[stream] = dgram.Dgram(config=self._run.dm.configs[stream], view=buf)
        return Event(dgrams=dgrams, run=self._run._run_ctx)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def scanned(run: Any, first: List[str]) -> EventTable:
    """The table of a finished run, from psana's own scan of its small data
    (`run.build_table()`), its transitions noted as the scan meets them."""
    table = EventTable(run, first)
    handle_transition = run._handle_transition

    def note_transition(dgrams: List[Any]) -> bool:
        table.note(dgrams, len(run._ts_table))
        return handle_transition(dgrams)

    run._handle_transition = note_transition
    try:
        with run.build_table():
            for ts, offsets in run._ts_table.items():
                table.add(ts, offsets)
    finally:
        del run._handle_transition
    return table
