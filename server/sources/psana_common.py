"""What psana1 and psana2 sources share: the seed's rules for turning psana's
per-event reads into frames.

- constants missing: a warning once, and calib gives raw, flagged
  `calibrated: false` (epix10k raw with its two gain bits masked, `& 0x3fff`);
- image needs constants (NO_CALIBRATION) and a geometry (NO_GEOMETRY);
- opal and rayonix are never assembled: their image is their calib frame;
- psana returning None is an error naming the event, never a fake array.

A flavour subclasses `PsanaDetectorSource` and supplies the event lookup and
the four per-event reads; everything else is decided here, once.
"""
import logging
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_CALIBRATION, NO_DATA, NO_GEOMETRY, READ_FAILED

from ..startup import StartupError
from .base import FrameMeta, FrameSpec, Source, SourceError

log = logging.getLogger(__name__)
GAIN_BITS_MASK = 0x3FFF
SAMPLES = 16        # events tried for a mode's shape before it counts as unavailable
MODES = ("raw", "calib", "image", "mask")


def experiment_path(template: str, exp: str) -> str:
    """A --data-dir that may name the experiment: `{exp}` and `{instrument}`
    (its first three letters) replaced."""
    return template.format(exp=exp, instrument=exp[:3])


def check_data_dir(template: Optional[str]) -> None:
    """StartupError with one line for a --data-dir naming anything but
    `{exp}` and `{instrument}`."""
    try:
        if template:
            experiment_path(template, "xpptut15")
    except (KeyError, IndexError, ValueError) as e:
        raise StartupError(f"--data-dir {template}: only {{exp}} and {{instrument}} may "
                           f"be named in braces ({e!r})") from None


def never_assembled(detector: str) -> bool:
    """Single-panel cameras whose frame already is the image."""
    name = detector.lower()
    return "opal" in name or "rayonix" in name


def uncalibrated(detector: str, raw: np.ndarray) -> np.ndarray:
    """Raw data as served when constants are missing (epix10k: gain bits masked)."""
    if detector.lower().startswith("epix10k"):
        return raw & GAIN_BITS_MASK
    return raw


class PsanaDetectorSource(Source):
    """Seed semantics over a psana flavour's per-event reads."""

    def __init__(self, detector: str, calibrated: bool, has_geometry: bool) -> None:
        self.detector = detector
        self.calibrated = calibrated
        self.has_geometry = has_geometry
        self._specs: Dict[str, Optional[FrameSpec]] = {}     # mode -> its shape, once read
        if not calibrated:
            log.warning("calibration data unavailable for %s: serving uncalibrated raw data "
                        "for calib", detector)

    # -- what a flavour supplies -------------------------------------------------
    def event(self, index: int) -> Any:
        """psana's event object for an index, or None if it cannot be had."""
        raise NotImplementedError

    def timestamp(self, index: int, evt: Any) -> Dict[str, int]:
        raise NotImplementedError

    def raw(self, evt: Any) -> Optional[np.ndarray]:
        raise NotImplementedError

    def calib(self, evt: Any) -> Optional[np.ndarray]:
        raise NotImplementedError

    def image(self, evt: Any, panels: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """The assembled image of the event's calib, or of `panels` when given."""
        raise NotImplementedError

    def mask(self, evt: Any) -> Optional[np.ndarray]:
        raise NotImplementedError

    # -- decided here ----------------------------------------------------------------
    def modes(self) -> Tuple[str, ...]:
        return MODES

    def sample_events(self) -> Iterable[int]:
        """Events to read shapes from, in turn, while they lack the mode's
        data: the first SAMPLES of the run (psana1 cannot tell which hold it)."""
        return range(min(len(self), SAMPLES))

    def specs(self) -> Dict[str, FrameSpec]:
        """Shapes come from reading a sample event once in every mode that works."""
        found = {mode: self.spec(mode) for mode in self.modes()}
        return {mode: spec for mode, spec in found.items() if spec is not None}

    def spec(self, mode: str) -> Optional[FrameSpec]:
        """The shape of one mode's frames, read once from the first sample
        event psana returns the mode for (None if none does, or the mode
        fails): sizing a frame costs the read of its own mode only (an
        image's geometry, say, is set up only when an image is asked for)."""
        if mode not in self._specs:
            self._specs[mode] = None
            for event in self.sample_events():
                try:
                    data, meta = self.read(event, mode)
                except SourceError as e:
                    if e.code in (READ_FAILED, NO_DATA):
                        continue    # psana had nothing for that event: try the next
                    break
                self._specs[mode] = FrameSpec(tuple(data.shape), str(data.dtype),
                                              meta.calibrated)
                break
        return self._specs[mode]

    def frame_nbytes(self, mode: str) -> Optional[int]:
        spec = self.spec(mode) if mode in self.modes() else None
        return None if spec is None else spec.nbytes

    def read(self, index: int, mode: str) -> Tuple[np.ndarray, FrameMeta]:
        evt = self.event(index)
        if evt is None:
            raise SourceError(READ_FAILED, f"event {index} of {self.detector} could not be read")
        calibrated = True
        if mode == "raw":
            frame = self.raw(evt)
        elif mode == "mask":
            frame = self.mask(evt)
        elif not self.calibrated:
            if mode == "image" and not never_assembled(self.detector):
                raise SourceError(NO_CALIBRATION, f"calibration data not found for "
                                                  f"{self.detector}: cannot assemble an image")
            raw = self.raw(evt)
            frame = None if raw is None else uncalibrated(self.detector, raw)
            calibrated = False
        elif mode == "image" and not never_assembled(self.detector):
            if not self.has_geometry:
                raise SourceError(NO_GEOMETRY, f"no geometry for {self.detector}: cannot "
                                               f"assemble an image")
            frame = self.image(evt)
        else:
            frame = self.calib(evt)
        if frame is None:
            raise SourceError(READ_FAILED, f"psana returned no {mode} data for event {index} "
                                           f"of {self.detector}")
        return np.asarray(frame), FrameMeta(timestamp=self.timestamp(index, evt),
                                            calibrated=calibrated)
