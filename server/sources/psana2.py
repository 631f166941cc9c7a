"""LCLS-II data through psana2: `iserver --source psana2`.

A request names exp, run and detector; the run is opened with
`psana.DataSource(exp=, run=[, dir=])` and read by event index through the
run's timestamp table (see psana2_run). Modes depend on the detector's kind
(see psana2_detectors): an area detector offers raw, calib, image and, when
psana has a pixel mask for it (it needs pixel_status constants), mask; a
waveform digitizer raw; a digitizer (hsd) waveforms and padded; a 1-D camera
raw and calib; a scalar or timing detector no frames, only fields beside
another detector's frame. Any field is also served as a frame by its own
name, e.g. detector `ebeam.ebeamPhotonEnergy` (psana2_field_source). An event
without the detector (one read out at a lower rate) is the error no_data.
Every frame's descriptor carries the event's 64-bit psana timestamp
(sec << 32 | nsec) as {"time": ts}. A request's access_mode is not used:
psana2 runs are always read by index.

Options:
  --data-dir DIR, --data-root ROOT, --files FILE ...
                   where runs are found (see psana2_location): the server
                   lists a run's files itself, so psana never asks the
                   logbook for them and never mixes up two experiments
  --offline        no network: skip psana's calibration database
  --calib-dir DIR  constants from files, for any detector that has them:
                     DIR/<detector>/<type>.npy      every constant type psana
                                                    knows: pedestals, pixel_gain,
                                                    pixel_status, pixel_offset,
                                                    pixel_rms, common_mode, ...,
                                                    in psana's shape, e.g. epix10ka
                                                    (7, panels, 352, 384), jungfrau
                                                    (3, panels, 512, 1024)
                     DIR/<detector>/geometry.txt    psana geometry text
                   A run's own folder DIR/<exp>/r<run:04d>/<detector>/, if it
                   exists, is used instead of DIR/<detector>/ for that run.
                   Files override the database's constants of the same type.

Without pedestals a detector is served uncalibrated (see psana_common); an
image needs a geometry that places every panel of the run: one supplied, or
psana's own default (psana ships jungfrau4M's, but only a 4-panel epix10ka
quad, so epix10k2M needs one supplied).

The runs a worker has open are shared by all of its sources: several
detectors of one run use one DataSource, and each detector is made once. A run
is closed when its last source is closed.
"""
import argparse
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_DATA
from psana_ipc.protocol.messages import CodeFilter, FieldRef, RunKey

from .base import FrameMeta, FrameSpec, Source, SourceError, SourceFactory
from . import psana2_location
from .event_ranges import as_ranges
from .psana2_detectors import (AREA, DIGITIZER, DIGITIZER_MODES, field_names, frame_method,
                               holds, kind_of, main_interface, missing, no_frames,
                               offered_modes)
from .psana2_env import STEP, STORES, pseudo_frames, step_info, store_info
from .psana2_field_source import FieldSource, is_field
from .psana2_fields import field_json
from .psana2_run import ARRAY_SUFFIX, GEOMETRY_FILE, OpenRun, datasource_class
from .psana2_values import sorted_channels, to_array
from .psana_common import PsanaDetectorSource, check_data_dir

SAMPLE_EVENTS = 64      # events tried for a mode's shape: a digitizer keeps waveforms in some


def geometry_fits(iface: Any) -> bool:
    """Whether the geometry psana would assemble with places every panel
    of the run (a wrong-sized default raises deep inside psana instead)."""
    det_geo = getattr(iface, "_det_geo", None)
    geo = det_geo() if det_geo else None
    if geo is None:
        return False
    panels = sum(1 for obj in geo.list_of_geos if obj.algo is not None)
    return panels > max(iface._segment_numbers)


class Psana2Source(PsanaDetectorSource):
    """One detector of an open run."""

    def __init__(self, factory: "Factory", opened: OpenRun, detector: str) -> None:
        self._factory = factory
        self._opened = opened
        self._det = opened.detector(detector)
        iface = self._det.use()
        self.kind = kind_of(iface)
        self._held = opened.events_of(detector)
        self._mask: Optional[np.ndarray] = None
        self._mask_read = False
        self._sampled = 0          # events holding the detector when shapes were looked for
        calibrated = self.kind != AREA or "pedestals" in opened.constants(detector)
        super().__init__(detector, calibrated, self.kind == AREA and geometry_fits(iface))

    def __len__(self) -> int:
        return len(self._opened.timestamps)

    def modes(self) -> Tuple[str, ...]:
        iface = self._det.use()
        offered = offered_modes(iface, has_mask=True)
        return tuple(m for m in offered if m != "mask" or self.mask(None) is not None)

    def spec(self, mode: str) -> Optional[FrameSpec]:
        """As for any psana source; in a live run, modes without a shape yet
        are looked for again once more events hold the detector (up to
        SAMPLE_EVENTS of them): none may have held it, or a digitizer's
        waveforms, when they were first looked for."""
        sampled = len(self.sample_events())
        if sampled > self._sampled:
            self._specs = {m: found for m, found in self._specs.items() if found is not None}
            self._sampled = sampled
        return super().spec(mode)

    def check_range(self, index: int) -> None:
        self._opened.reach(index)
        super().check_range(index)

    def growth(self) -> Dict[str, Any]:
        return self._opened.state()

    def held(self) -> List[int]:
        return self._held

    def check(self, index: int, mode: str) -> None:
        """Also no_data for an event without the detector, or without a
        digitizer's waveforms: told before the server reserves memory."""
        if not self.modes():
            classes = self._opened.interfaces(self.detector)
            raise no_frames(self.detector, self.kind,
                            field_names(self.detector, classes, self._opened.run.detinfo))
        super().check(index, mode)
        if not self._opened.holds(self.detector, index):
            raise missing(self.detector, index)
        if mode in DIGITIZER_MODES:
            self.digitized(index, mode)

    def sample_events(self) -> List[int]:
        return self._held[:SAMPLE_EVENTS]

    def info(self) -> Dict[str, Any]:
        """Events counts those that hold the detector; run_events all of the
        run's (so far, in a live run: see OpenRun.state); a digitizer's
        channels are listed in the order its frames stack them, as [segment,
        channel]."""
        state = self.growth()      # a live run: brought up to date first
        info = dict(super().info(), events=len(self._held), kind=self.kind, **state)
        if self.kind == DIGITIZER:
            info["channels"] = self.channels()
        return info

    def channels(self) -> List[List[int]]:
        """[segment, channel] of each row of a digitizer's frames."""
        for mode in self.modes():
            for event in self.sample_events():
                answer = frame_method(self._det.use(), mode)(self.event(event))
                if answer is not None:
                    return [[int(s), int(c)] for s, c, _ in sorted_channels(answer)]
        return []

    def present(self) -> List[List[int]]:
        return as_ranges(self._held)

    def event(self, index: int) -> Any:
        evt = self._opened.event(index)
        if not holds(evt, self.detector, self._det.interface):
            raise missing(self.detector, index)
        return evt

    def digitized(self, index: int, mode: str) -> np.ndarray:
        """A digitizer's waveforms or padded peaks, its channels stacked."""
        answer = frame_method(self._det.use(), mode)(self.event(index))
        if answer is None:
            raise SourceError(NO_DATA, f"event {index} holds no {mode} of {self.detector}: "
                                       f"psana gives none for it (a digitizer keeps its raw "
                                       f"waveforms in some events only, and pads peaks only "
                                       f"where it found some)")
        return to_array(f"{self.detector} {mode}", mode, answer)

    def read(self, index: int, mode: str) -> Tuple[np.ndarray, FrameMeta]:
        if mode not in DIGITIZER_MODES:
            return super().read(index, mode)
        frame = self.digitized(index, mode)
        return frame, FrameMeta(timestamp=self.timestamp(index, self._opened.event(index)))

    def field(self, index: int, ref: FieldRef) -> Dict[str, Any]:
        """A value of any detector of the run (or an EPICS PV, a scan variable,
        the step) in this event, or over the batch it ends (see psana2_fields)."""
        self.check_range(index)
        return field_json(self._opened, index, ref, self._held)

    def timestamp(self, index: int, evt: Any) -> Dict[str, int]:
        return {"time": int(evt.timestamp)}

    def raw(self, evt: Any) -> Optional[np.ndarray]:
        return frame_method(self._det.use(), "raw")(evt)

    def calib(self, evt: Any) -> Optional[np.ndarray]:
        return self._det.use().calib(evt)

    def image(self, evt: Any, panels: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """The event's calib frame assembled, or `panels` assembled by the
        run's geometry (what btx's `PsanaImg.assemble` asks for)."""
        return self._det.use().image(evt, nda=panels)

    def mask(self, evt: Any) -> Optional[np.ndarray]:
        """psana's pixel mask, the same for every event (None without pixel_status)."""
        if not self._mask_read:
            self._mask = self._det.use()._mask()
            self._mask_read = True
        return self._mask

    def close(self) -> None:
        self._factory.release(self._opened)


class Factory(SourceFactory):
    name = "psana2"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "psana2 source", "LCLS-II XTC2 runs read with psana2, by event index.")
        psana2_location.add_arguments(group)
        group.add_argument("--offline", action="store_true",
                           help="use no network: skip psana's calibration database")
        group.add_argument("--calib-dir", metavar="DIR",
                           help=f"offline constants: DIR/<detector>/<type>{ARRAY_SUFFIX} for "
                                f"every type (pedestals, pixel_gain, pixel_status, "
                                f"pixel_offset, ...; arrays in psana's shape) and "
                                f"DIR/<detector>/{GEOMETRY_FILE} (psana geometry text), or for "
                                f"one run in DIR/<exp>/r<run:04d>/<detector>/; they override "
                                f"the database's")

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__(options)
        self._runs: Dict[Tuple[str, int], OpenRun] = {}
        check_data_dir(options.data_dir)
        self._listed = psana2_location.runs_of_files(options.files)

    def _acquire(self, exp: str, run: int) -> OpenRun:
        """The open run (a live one brought up to date), one user more."""
        opened = self._runs.get((exp, run))
        if opened is None:
            files = psana2_location.find_run(exp, run, self.options, self._listed)
            opened = OpenRun(exp, run, files, self.options.offline, self.options.calib_dir)
            self._runs[(exp, run)] = opened
        opened.refresh()
        opened.users += 1
        return opened

    def release(self, opened: OpenRun) -> None:
        """One user fewer; the last one closes the run."""
        opened.users -= 1
        if opened.users <= 0:
            del self._runs[(opened.exp, opened.runnum)]
            opened.close()

    def open(self, key: RunKey) -> Source:
        opened = self._acquire(key.exp, key.run)
        try:
            if key.detector in STORES + (STEP,):
                raise pseudo_frames(key.detector)
            if is_field(key.detector):
                return FieldSource(self, opened, key.detector)
            return Psana2Source(self, opened, key.detector)
        except BaseException:
            self.release(opened)
            raise

    def detectors(self, exp: str, run: int) -> Dict[str, Any]:
        """Every detector with its kind and modes, judged from the class psana
        picks for its raw interface (no detector is made), the events holding
        it and its fields; one that serves no frames says why (`note`); mask
        is listed where pixel_status constants are known. Then the run's
        EPICS PVs, scan variables and steps (psana2_env)."""
        opened = self._acquire(exp, run)
        try:
            found: Dict[str, Any] = {}
            for name, dettype, _, _ in opened.run.xtcinfo:
                if name not in opened.run.detnames or name in found:
                    continue
                classes = opened.interfaces(name)
                raw = classes[main_interface(classes)]
                held = opened.events_of(name)
                has_mask = "pixel_status" in opened.constants(name)
                fields = field_names(name, classes, opened.run.detinfo)
                found[name] = {"type": dettype, "kind": kind_of(raw), "interfaces": sorted(classes),
                               "modes": list(offered_modes(raw, has_mask)), "fields": fields,
                               "events": len(held), "present": as_ranges(held)}
                if not found[name]["modes"]:
                    found[name]["note"] = no_frames(name, kind_of(raw), fields).message
            for store in STORES:
                listed = store_info(opened.run, opened.timestamps, store)
                if listed:
                    found[store] = listed
            steps = step_info(opened.run, opened.steps)
            if steps:
                found[STEP] = steps
            return found
        finally:
            self.release(opened)

    def prepare_worker(self) -> None:
        """psana takes about a second to import."""
        datasource_class()

    def run_state(self, exp: str, run: int) -> Dict[str, Any]:
        opened = self._acquire(exp, run)
        try:
            return opened.state()
        finally:
            self.release(opened)

    def next_run(self, exp: str, run: int) -> Optional[int]:
        return psana2_location.next_run(exp, run, self.options, self._listed)

    def events_with_codes(self, exp: str, run: int, codes: CodeFilter) -> List[int]:
        opened = self._acquire(exp, run)
        try:
            return opened.event_codes().events(codes)
        finally:
            self.release(opened)

    def close(self) -> None:
        """psana starts MPI in every process that imports it; finalize it, or
        MPI leaves a segment in /dev/shm when the worker exits with os._exit."""
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
