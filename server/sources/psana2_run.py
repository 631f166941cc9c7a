"""One psana2 run opened for random access by event index, offline if asked.

psana reads a run in file order. `run.build_table()` scans the run's
small-data files once and maps every event's timestamp to its offsets; the
table's keys in file order are our event indices. The table is built once
per run; psana cannot build it twice. Events are read through
psana2_chunks.EventTable, which is right where psana's `run.event(ts)` is
wrong (runs split into chunk files) and checks every record first.

A run the DAQ is still writing (`live`) is opened the same way, but its
table is filled as its small data grows (psana2_live); `refresh()` takes in
what was written since, and every request that needs more than is known
(info, an event past the last one known) looks first. Event indices never
change as the run grows, and are those of the finished run.

psana is imported here, inside functions, never when the module is imported.
"""
import bisect
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import NOT_FOUND, OUT_OF_RANGE, UNKNOWN_DETECTOR

from .base import FINISHED, SourceError
from .psana2_chunks import EventTable, scanned
from .psana2_codes import EventCodes, codes_method, no_timing
from .psana2_detectors import events_with, main_interface, streams_of
from .psana2_live import GrowingRun, begun
from .psana2_location import RunFiles, files_listed
from .psana2_shared import RunDetector, release_all

log = logging.getLogger(__name__)

# <calib dir>/<detector>/<constant type><suffix>: arrays in psana's shape, the
# geometry as psana's geometry text; psana reads the types it knows
# (pedestals, pixel_gain, pixel_rms, pixel_status, status_extra, pixel_mask,
# pixel_offset, common_mode, ...) and ignores the others.
ARRAY_SUFFIX = ".npy"
GEOMETRY_FILE = "geometry.txt"


def datasource_class() -> Any:
    """psana's DataSource, in serial mode: psana decides between MPI and
    serial when it is first imported, from PS_PARALLEL, and a worker reads
    one event at a time by itself (`build_table` exists only in serial mode)."""
    os.environ["PS_PARALLEL"] = "none"
    from psana import DataSource
    forget_mpi_segment()
    return DataSource


def forget_mpi_segment() -> None:
    """Importing psana starts MPI, and MPICH then maps a segment named
    /dev/shm/mpich_shm_<pid in hex>_<n>, which a process alone in its MPI
    world (a server worker) shares with nobody. Its name is removed at once
    (the mapping stays valid), so that a worker that dies, even inside
    psana, leaves nothing in /dev/shm."""
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() != 1:
        return
    prefix = f"mpich_shm_{os.getpid():x}_"
    for entry in Path("/dev/shm").glob(prefix + "*"):
        entry.unlink()


def constants_folder(calib_dir: str, exp: str, run: int, detector: str) -> Path:
    """The run's own folder, <calib dir>/<exp>/r<run:04d>/<detector>, if it
    exists, else the one for all runs, <calib dir>/<detector>."""
    own = Path(calib_dir) / exp / f"r{run:04d}" / detector
    return own if own.is_dir() else Path(calib_dir) / detector


def read_constants(calib_dir: str, exp: str, run: int, detector: str) -> Dict[str, Tuple[Any, Dict]]:
    """Every constant of `detector` found in `calib_dir`, in the form psana's
    calibration database returns them: {ctype: (value, metadata)}."""
    folder = constants_folder(calib_dir, exp, run, detector)
    found = {path.stem: path for path in sorted(folder.glob("*" + ARRAY_SUFFIX)) if path.is_file()}
    if (folder / GEOMETRY_FILE).is_file():
        found["geometry"] = folder / GEOMETRY_FILE
    return {ctype: (path.read_text() if path.name == GEOMETRY_FILE else np.load(path),
                    {"experiment": exp, "run": run, "ctype": ctype, "detector": detector,
                     "path": str(path)})
            for ctype, path in found.items()}


class OpenRun:
    """A DataSource, its run and its event table; each detector made once."""

    def __init__(self, exp: str, run: int, files: RunFiles, offline: bool,
                 calib_dir: Optional[str]) -> None:
        self.exp = exp
        self.runnum = run
        self.calib_dir = calib_dir
        self.users = 0
        self._detectors: Dict[str, RunDetector] = {}
        where = files.directory
        kwargs: Dict[str, Any] = {"exp": exp, "run": run, "dir": files.directory}
        if offline:
            kwargs["skip_calib_load"] = "all"
        if files.live and not begun(files.smalldata()):
            raise SourceError(NOT_FOUND, f"run {run} of {exp} in {where} is being written but "
                                         f"has not begun yet (no BeginRun in every stream)")
        DataSource = datasource_class()
        release_all()  # opening re-initialises psana's shared detector objects
        try:
            with files_listed(files):
                self._ds = DataSource(**kwargs)
                self.run = next(self._ds.runs(), None)
        except (AssertionError, FileNotFoundError) as e:
            raise SourceError(NOT_FOUND, f"run {run} of {exp} not found in {where}: {e}") from e
        if self.run is None or (self.run.expt and self.run.expt != exp):
            found = ("psana finds no run in its files: a run starts with Configure and "
                     "BeginRun records" if self.run is None else f"a run of {self.run.expt}")
            self._ds.dm.close()
            raise SourceError(NOT_FOUND, f"run {run} of {exp} not found in {where} ({found})")
        self._growing: Optional[GrowingRun] = None
        if files.live:
            self._table = EventTable(self.run, files.chunk0())
            self._growing = GrowingRun(self.run, files.smalldata(), self._table)
            self._growing.look()
        else:
            self._table = scanned(self.run, files.chunk0())
        self.timestamps: List[int] = self._table.timestamps
        # per event, the streams holding a record of it: which detectors it has
        self.event_streams = self._table.event_streams()
        self._held: Dict[str, List[int]] = {}
        self._last: Tuple[int, Any] = (-1, None)
        self._codes: Optional[EventCodes] = None
        log.info("opened %srun %d of %s from %s: %d events, detectors %s",
                 "live " if files.live else "", run, exp, where, len(self.timestamps),
                 ", ".join(sorted(self.run.detnames)))

    @property
    def steps(self) -> List[Tuple[int, int, int]]:
        return self._table.steps

    @property
    def live(self) -> bool:
        """Whether the run may still grow."""
        return self._growing is not None and not self._growing.ended

    def refresh(self) -> None:
        """A live run: take in the events written since the last look."""
        if not self.live:
            return
        known = len(self.timestamps)
        self._growing.look()
        if len(self.timestamps) == known:
            return
        grown = self._table.event_streams(known)
        self.event_streams.extend(grown)
        for name, held in self._held.items():
            held.extend(known + i for i in events_with(grown, streams_of(self.run.configs, name)))
        if self._codes is not None:
            self._codes.add(self.events_of(self._codes.detector)[len(self._codes.held):])

    def reach(self, index: int) -> None:
        """Refresh a live run if event `index` is past the events known; an
        event not written yet is out of range, saying so."""
        if index < len(self.timestamps) or not self.live:
            return
        self.refresh()
        if index >= len(self.timestamps) and self.live:
            raise SourceError(OUT_OF_RANGE, f"event {index} of run {self.runnum} of {self.exp} "
                                            f"is not written yet: the run is being written and "
                                            f"has {len(self.timestamps)} events so far")

    def state(self) -> Dict[str, Any]:
        """Where the run stands, after a look: `live` while it may grow,
        `ended` why it cannot (END_RUN, RENAMED, or FINISHED when it was
        opened finished), its events so far and, live, the seconds since its
        small data was last written (`idle`)."""
        self.refresh()
        growing = self._growing
        ended = FINISHED if growing is None else growing.ended
        return {"live": self.live, "ended": ended, "run_events": len(self.timestamps),
                "idle": round(growing.idle(), 3) if growing is not None else 0.0}

    def detector(self, name: str) -> RunDetector:
        """The run's detector `name`; constants from the calib dir are put in
        place first, since psana reads them when the detector is made."""
        if name not in self._detectors:
            if name not in self.run.detnames:
                raise SourceError(UNKNOWN_DETECTOR, f"run {self.runnum} of {self.exp} has no "
                                                    f"detector {name!r}; it has "
                                                    f"{', '.join(sorted(self.run.detnames))}")
            if self.calib_dir:
                found = read_constants(self.calib_dir, self.exp, self.runnum, name)
                self.run.dsparms.calibconst.setdefault(name, {}).update(found)
            self._detectors[name] = RunDetector(self.run, name,
                                                main_interface(self.interfaces(name)))
        return self._detectors[name]

    def constants(self, name: str) -> Dict[str, Any]:
        return self.run.dsparms.calibconst.get(name) or {}

    def events_of(self, name: str) -> List[int]:
        """Indices of the events that hold detector `name`."""
        if name not in self._held:
            self._held[name] = events_with(self.event_streams, streams_of(self.run.configs, name))
        return self._held[name]

    def holds(self, name: str, index: int) -> bool:
        """Whether event `index` holds detector `name`."""
        held = self.events_of(name)
        at = bisect.bisect_left(held, index)
        return at < len(held) and held[at] == index

    def interfaces(self, name: str) -> Dict[str, Any]:
        """Interface name -> the psana class serving it, without making the detector."""
        return {iface: cls for (det, iface), cls in self.run.dsparms.det_classes["normal"].items()
                if det == name}

    def event(self, index: int) -> Any:
        """psana's event; the last one is kept, so a frame and the fields read
        beside it cost one read."""
        if self._last[0] != index:
            self._last = (index, self._table.event(index))
        return self._last[1]

    def event_of(self, index: int, name: str) -> Any:
        """psana's event with only the records of the streams holding `name`
        (the last one read whole if it is this one)."""
        if self._last[0] == index:
            return self._last[1]
        return self._table.event(index, streams_of(self.run.configs, name))

    def event_codes(self) -> EventCodes:
        """Every event's codes, read once (see psana2_codes)."""
        if self._codes is None:
            found = ((name, codes_method(self.interfaces(name)))
                     for name in sorted(self.run.detnames))
            timing = next(((name, iface) for name, iface in found if iface), None)
            if timing is None:
                raise no_timing(self.exp, self.runnum, self.run.detnames)
            name, iface = timing
            det = self.detector(name)
            det.use()
            read = getattr(det.container, iface).eventcodes
            self._codes = EventCodes(name, lambda event: read(self.event_of(event, name)))
            self._codes.add(self.events_of(name))
        return self._codes

    def close(self) -> None:
        self._last = (-1, None)
        for det in self._detectors.values():
            det.forget()
        self._detectors.clear()
        self._table.close()
        if self._growing is not None:
            self._growing.close()
        self.run.dm.close()
        self.run = self._ds = None
