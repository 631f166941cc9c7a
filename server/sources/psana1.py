"""LCLS-I runs through psana1 (`--source psana1`).

Random access the way psana1 offers it: `DataSource('exp=E:run=R:idx')`
(plus `:dir=D` with `--data-dir`), the run's event times, `run.event(t)`,
and `psana.Detector(name, env)` for raw/calib/image/mask. An alternative
calibration directory (`--calib-dir`) is psana's option `psana.calib-dir`
(the name psana's PSAna.cpp reads), which psana1 reads when a DataSource is
created, so it is set before each one. Without it psana1 looks in
`$SIT_PSDM_DATA/<instrument>/<exp>/calib`, whatever `--data-dir` says.

Constants count as available when psana1 has pedestals and gain for the
run (as btx's `_calib_data_available` checks) and the pedestals were loaded
from a file: for a fixed-size detector (epix10k, jungfrau, cspad) with no
file, psana1 returns PSCalib's default constants (pedestals 0, gain 1)
instead of None, and its calib is then raw data, not calibrated. Geometry
is available when psana1 has pixel coordinates. The seed's rules for both
cases live in psana_common.

psana1 runs only in the LCLS conda environments; the tests drive this
module with a stand-in package (tests/psana1_standin) that mirrors the
psana1 calls made here.
"""
import argparse
from typing import Any, Dict, Optional

import numpy as np

from psana_ipc.protocol.errors import BAD_REQUEST, NOT_FOUND, UNKNOWN_DETECTOR
from psana_ipc.protocol.messages import RunKey

from .base import SourceError, SourceFactory
from .psana_common import PsanaDetectorSource, check_data_dir, experiment_path

CALIB_DIR_OPTION = "psana.calib-dir"
PEDESTALS = 0   # PSCalib's calibration type of pedestals
DEFAULT = 2     # PSCalib's loading status of default constants (zeros, ones)


def dataset_name(exp: str, run: int, data_dir: Optional[str]) -> str:
    """psana1's dataset string for random access, e.g. 'exp=mfxp1234:run=7:idx:dir=/data/xtc'
    (`{exp}` in `data_dir` is the experiment)."""
    name = f"exp={exp}:run={run}:idx"
    return name if data_dir is None else f"{name}:dir={experiment_path(data_dir, exp)}"


def constants_loaded(det: Any, run: int) -> bool:
    """Whether psana1 calibrates `det` with constants from files: pedestals
    and gain exist, and the pedestals are not PSCalib's defaults."""
    if det.pedestals(run) is None or det.gain(run) is None:
        return False
    return det.loading_status(run, PEDESTALS) != DEFAULT


def detector_names(psana: Any, ds: Any) -> Dict[str, Dict[str, str]]:
    """The run's detectors by the name users know them by (the DAQ alias
    where there is one), with both of psana1's names."""
    return {alias or full: {"full_name": full, "alias": alias}
            for full, alias, _ in psana.DetNames("detectors", ds.env())}


class Psana1Source(PsanaDetectorSource):
    """One detector of one psana1 run, events addressed by the run's times."""

    def __init__(self, psana: Any, run: Any, det: Any, key: RunKey) -> None:
        self._event_id = psana.EventId
        self._run = run
        self._det = det
        self._times = run.times()
        super().__init__(key.detector, constants_loaded(det, key.run),
                         det.coords_x(key.run) is not None)

    def __len__(self) -> int:
        return len(self._times)

    def event(self, index: int) -> Any:
        return self._run.event(self._times[index])

    def timestamp(self, index: int, evt: Any) -> Dict[str, int]:
        """psana1's EventId: seconds, nanoseconds, fiducial, and the two
        packed as one 64-bit `time` like the other sources give."""
        event_id = evt.get(self._event_id)
        seconds, nanoseconds = event_id.time()
        return {"time": (seconds << 32) | nanoseconds, "seconds": seconds,
                "nanoseconds": nanoseconds, "fiducial": event_id.fiducials()}

    def raw(self, evt: Any) -> Optional[np.ndarray]:
        return self._det.raw(evt)

    def calib(self, evt: Any) -> Optional[np.ndarray]:
        return self._det.calib(evt)

    def image(self, evt: Any, panels: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """The event's calib frame assembled, or `panels` assembled by the
        event's geometry (what btx's `PsanaImg.assemble` asks for)."""
        return self._det.image(evt, panels)

    def mask(self, evt: Any) -> Optional[np.ndarray]:
        """Bad pixels from the calibration mask and pixel status."""
        return self._det.mask(evt, calib=True, status=True)


class Factory(SourceFactory):
    name = "psana1"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """No options of its own: one server runs one source, so psana1 reads
        the psana2 source's --data-dir and --calib-dir rather than define
        a second option of each name."""
        parser.add_argument_group(
            "psana1 source", "LCLS-I runs read with psana1, by event index. It takes\n"
                             "--data-dir (the dataset's dir=) and --calib-dir (psana's option\n"
                             "psana.calib-dir) from the psana2 source's options.")

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__(options)
        check_data_dir(options.data_dir)

    def open(self, key: RunKey) -> PsanaDetectorSource:
        if key.access_mode != "idx":
            raise SourceError(BAD_REQUEST, f"psana1 reads events by index only in idx mode, "
                                           f"not {key.access_mode!r}")
        import psana
        ds = self._datasource(psana, key.exp, key.run)
        try:
            det = psana.Detector(key.detector, ds.env())
        except KeyError:
            names = ", ".join(detector_names(psana, ds))
            raise SourceError(UNKNOWN_DETECTOR, f"no detector {key.detector!r} in exp={key.exp} "
                                                f"run={key.run}; it has {names}") from None
        run = next(ds.runs(), None)
        if run is None:
            raise SourceError(NOT_FOUND, f"exp={key.exp} run={key.run} has no run")
        return Psana1Source(psana, run, det, key)

    def detectors(self, exp: str, run: int) -> Dict[str, Dict[str, Any]]:
        import psana
        ds = self._datasource(psana, exp, run)
        events = len(next(ds.runs()).times())
        return {name: dict(info, events=events)
                for name, info in detector_names(psana, ds).items()}

    def _datasource(self, psana: Any, exp: str, run: int) -> Any:
        if self.options.calib_dir:
            psana.setOption(CALIB_DIR_OPTION, self.options.calib_dir)
        try:
            return psana.DataSource(dataset_name(exp, run, self.options.data_dir))
        except RuntimeError as e:
            raise SourceError(NOT_FOUND, f"exp={exp} run={run}: {e}") from e
