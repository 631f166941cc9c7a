"""btx's `PsanaImg` and `PsanaInterface`, for code that runs inside the psana
environment and reads events itself, without a server.

Both are thin layers over the server's own sources (psana1 or psana2,
whichever `import psana` provides), so they read, calibrate and apply the
seed's rules exactly as `iserver` does; errors are the sources' `SourceError`
with a protocol code (`out_of_range`, `no_calibration`, ...).
"""
import logging
from typing import Any, List, Optional

import numpy as np

from psana_ipc.protocol.errors import NO_GEOMETRY, READ_FAILED
from psana_ipc.protocol.messages import RunKey

from .sources import factory_class, source_options
from .sources.base import Source, SourceError

log = logging.getLogger(__name__)


def psana_flavour() -> str:
    """'psana2' when `import psana` is LCLS-II psana (it reads XTC2), else 'psana1'."""
    import psana
    return "psana2" if getattr(psana, "xtc_version", 1) == 2 else "psana1"


def open_source(exp: str, run: int, detector: str, access_mode: str = "idx",
                **options: Any) -> Source:
    """A source as `iserver --source <flavour>` would open it: the iserver
    defaults of the source options, overridden by `options` (`data_dir`,
    `calib_dir`, and for psana2 `offline`)."""
    flavour = psana_flavour()
    return factory_class(flavour)(source_options(**options)).open(
        RunKey(exp, int(run), detector, access_mode))


class PsanaImg:
    """Random access to one detector of one run, by event index."""

    def __init__(self, exp: str, run: int, mode: str, detector_name: str, **options: Any) -> None:
        """`options`: source options as in `open_source`, e.g. calib_dir."""
        self.source = open_source(exp, run, detector_name, mode, **options)
        self.detector_name = detector_name

    def __len__(self) -> int:
        return len(self.source)

    def get(self, event_num: int, id_panel: Optional[int] = None, mode: str = "calib") -> np.ndarray:
        """The frame of one event in `mode` (raw, calib, image or mask), or one
        panel of it; a copy, since psana2 reuses its output arrays."""
        self.source.check(event_num, mode)
        data, _ = self.source.read(event_num, mode)
        return np.array(data[int(id_panel)] if id_panel is not None else data)

    def assemble(self, multipanel: Optional[np.ndarray] = None, mode: str = "image",
                 fake_event_num: int = 0) -> np.ndarray:
        """The image of event `fake_event_num`, or `multipanel` (an array shaped
        like calib) assembled with that event's geometry."""
        if multipanel is None:
            return self.get(fake_event_num, mode=mode)
        self.source.check(fake_event_num, mode)
        image = self.source.image(self.source.event(fake_event_num), multipanel)
        if image is None:
            raise SourceError(NO_GEOMETRY, f"no geometry for {self.detector_name} to assemble "
                                           f"the panels with")
        return np.array(image)


class PsanaInterface:
    """Sequential batches of a run's images, as btx's PsanaInterface gives them:
    `get_images` continues where the previous call stopped (`counter`)."""

    def __init__(self, exp: str, run: int, det_type: str, calibdir: Optional[str] = None,
                 track_timestamps: bool = False, **options: Any) -> None:
        """`options`: source options as in `open_source`, e.g. data_dir."""
        self.exp = exp
        self.run = run
        self.det_type = det_type
        self.source = open_source(exp, run, det_type, "idx", calib_dir=calibdir, **options)
        self.max_events = len(self.source)
        self.calibrate = self.source.calibrated
        self.counter = 0
        self.track_timestamps = track_timestamps
        self.timestamps: List[Any] = []

    def get_images(self, num_images: int, assemble: bool = True) -> np.ndarray:
        """The next `num_images` frames (fewer at the end of the run), assembled
        into images or as calib panels; events psana has no data for are
        skipped, as btx does. With `track_timestamps`, each returned frame's
        timestamp is appended to `timestamps`."""
        mode = "image" if assemble else "calib"
        images: Optional[np.ndarray] = None
        count = 0
        while count < num_images and self.counter < self.max_events:
            try:
                frame, meta = self.source.read(self.counter, mode)
            except SourceError as e:
                if e.code != READ_FAILED:
                    raise
                log.warning("skipping event %d: %s", self.counter, e.message)
            else:
                if images is None:
                    images = np.empty((num_images,) + frame.shape, frame.dtype)
                images[count] = frame
                count += 1
                if self.track_timestamps:
                    self.timestamps.append(meta.timestamp)
            self.counter += 1
        if images is None:   # nothing read: an empty batch shaped like event 0's frame
            self.source.check(0, mode)
            frame, _ = self.source.read(0, mode)
            images = np.empty((0,) + frame.shape, frame.dtype)
        if count < num_images:
            log.info("no more events to retrieve: %d of %d", self.counter, self.max_events)
        return images[:count]
