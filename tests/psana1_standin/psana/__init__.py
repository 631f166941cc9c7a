"""A stand-in for LCLS-I psana ("psana1"), for tests only.

psana1 exists only in the LCLS conda environments and cannot be installed
here, so the psana1 source is tested against this package, which mirrors
the part of psana1's API the source uses, as psana1 itself behaves
(psana's PSAna.cpp, IData's Dataset.cpp, PSCalib's GenericCalibPars,
Detector's AreaDetector):

    setOption('psana.calib-dir', DIR)      # read when a DataSource is created;
                                           # other names (psana.calib_dir) are ignored
    ds = DataSource('exp=E:run=R:idx[:dir=D]')
    ds.env(); run = next(ds.runs())
    run.times() -> [EventTime]; run.event(t) -> Event, or None for a time
                                                 not in the run
    EventTime.seconds()/nanoseconds()/fiducial()/time()
    evt.get(EventId) -> EventId with time() -> (sec, nsec) and fiducials()
    det = Detector(name, env)                # KeyError for an unknown name
    det.raw/calib/image(evt), det.mask(par, calib=, status=, edges=),
    det.pedestals/gain/shape/coords_x/image_xaxis/image_yaxis(par),
    det.loading_status(par, calibtype) -> LOADED (1) or DEFAULT (2)
    DetNames('detectors', env) -> [(full name, alias, user alias)]

where `par` is an Event or a run number, and None stands for anything
missing: geometry, a detector's data in one event, constants of a camera.

Where things are, as psana1 looks for them (the instrument is the
experiment's first three letters, upper case, as psana1's experiment
database names it):

    xtc dir    dir= of the dataset name, else $SIT_PSDM_DATA/<INSTR>/<exp>/xtc
    calib dir  the psana.calib-dir option, else $SIT_PSDM_DATA/<INSTR>/<exp>/calib
               whatever dir= says

A run is described by `<xtc dir>/<exp>-r<run:04d>.json`:

    {"events": 4,
     "detectors": {"epix10k2M": {"full_name": "MfxEndstation.0:Epix10ka2M.0",
                                 "shape": [4, 8, 12], "geometry": true,
                                 "gain_bits": 49152, "missing": [2]}}}

`missing` lists events without data of that detector; `gain_bits` are
OR-ed into raw, as epix10k's gain-switch bits are. Constants are
`<calib dir>/<detector>.json` = {"pedestal": P, "gain": G}. Without that
file a fixed-size detector (epix10k, jungfrau, cspad, ...) gets PSCalib's
default constants: pedestals all 0, gain all 1, loading status DEFAULT;
a camera (opal, ...) has no size to make defaults of and gets None. Data:

    raw   = (flat pixel index + 101 * event) % 16384 | gain_bits    uint16
    calib = ((raw without gain bits) - P) * G   (psana1 multiplies by
            pixel gain)                                           float32
    image = calib panels on a near-square grid, 2 pixels apart, placed
            through per-pixel indices as psana1 does
    event time = (1500000000 + e // 120) s + (e % 120) * 8333333 ns
    fiducial   = (0x3000 + 3 * e) % 0x1FFE0          (120 Hz of 360 Hz)
"""
import json
import math
import os

import numpy as np

PERIOD = 16384
STEP = 101
SEC0 = 1500000000
RATE = 120
NSEC_PER_SHOT = 8333333
FID0 = 0x3000
FID_WRAP = 0x1FFE0
GAP = 2
PIXEL_UM = 100.0
CALIB_DIR_OPTION = "psana.calib-dir"
DATA_ROOT = "/reg/d/psdm"
LOADED, DEFAULT = 1, 2              # PSCalib's loading statuses
PEDESTALS, PIXEL_GAIN = 0, 3        # PSCalib's calibration types
FIXED_SIZE = ("Epix10ka", "Jungfrau", "Cspad", "Epix100a", "Pnccd")

_options = {}
_last_env = None


def setOption(name, value):
    _options[name] = value


class EventTime:
    def __init__(self, time, fiducial):
        self._time = int(time)
        self._fiducial = int(fiducial)

    def time(self):
        return self._time

    def seconds(self):
        return self._time >> 32

    def nanoseconds(self):
        return self._time & 0xFFFFFFFF

    def fiducial(self):
        return self._fiducial

    def __eq__(self, other):
        return isinstance(other, EventTime) and (self._time, self._fiducial) == \
            (other._time, other._fiducial)

    def __hash__(self):
        return hash((self._time, self._fiducial))


class EventId:
    def __init__(self, time):
        self._time = time

    def time(self):
        return (self._time.seconds(), self._time.nanoseconds())

    def fiducials(self):
        return self._time.fiducial()


class Event:
    def __init__(self, index, time):
        self.index = index
        self._id = EventId(time)

    def get(self, kind, src=None):
        return self._id if kind is EventId else None


def event_time(index):
    seconds, shot = divmod(index, RATE)
    return EventTime(((SEC0 + seconds) << 32) | shot * NSEC_PER_SHOT,
                     (FID0 + 3 * index) % FID_WRAP)


class Env:
    def __init__(self, description, calib_dir):
        self.description = description
        self.calib_dir = calib_dir


class Run:
    def __init__(self, env, idx):
        self._env = env
        self._idx = idx
        self._times = [event_time(i) for i in range(env.description["events"])]
        self._index = {t: i for i, t in enumerate(self._times)}

    def times(self):
        if not self._idx:
            raise RuntimeError("times() is only available in idx mode")
        return list(self._times)

    def event(self, time):
        index = self._index.get(time)
        return None if index is None else Event(index, time)


def _parse(dsname):
    """'exp=E:run=R:idx:dir=D' -> ({'exp': E, 'run': R, 'dir': D}, {'idx'})."""
    keys, flags = {}, set()
    for part in dsname.split(":"):
        name, sep, value = part.partition("=")
        if sep:
            keys[name] = value
        else:
            flags.add(name)
    return keys, flags


def _experiment_dir(exp, kind):
    """$SIT_PSDM_DATA/<INSTR>/<exp>/<kind>, as psana1 builds its defaults."""
    return os.path.join(os.environ.get("SIT_PSDM_DATA", DATA_ROOT), exp[:3].upper(), exp, kind)


class DataSource:
    def __init__(self, dsname):
        global _last_env
        keys, flags = _parse(dsname)
        exp, run = keys["exp"], int(keys["run"])
        xtc_dir = keys.get("dir") or _experiment_dir(exp, "xtc")
        path = os.path.join(xtc_dir, f"{exp}-r{run:04d}.json")
        if not os.path.exists(path):
            raise RuntimeError(f"no xtc files found for exp={exp}:run={run} in {xtc_dir}")
        with open(path) as f:
            description = json.load(f)
        calib_dir = _options.get(CALIB_DIR_OPTION) or _experiment_dir(exp, "calib")
        self._env = Env(description, calib_dir)
        self._idx = "idx" in flags
        _last_env = self._env

    def env(self):
        return self._env

    def runs(self):
        yield Run(self._env, self._idx)


def _names(env):
    """(full name, alias, config) of every detector of the run."""
    for alias, config in env.description["detectors"].items():
        yield config.get("full_name", alias), alias, config


def DetNames(nametype="detectors", local_env=None):
    env = local_env or _last_env
    return [(full, alias, "") for full, alias, _ in _names(env)]


def Detector(name, local_env=None, accept_missing=False):
    env = local_env or _last_env
    if env is None:
        raise RuntimeError("Detector object cannot be created before an instance of "
                           "psana.DataSource exists")
    for full, alias, config in _names(env):
        if name in (full, alias):
            return AreaDetector(alias, config, env)
    raise KeyError(f"detector {name!r} not found in the data")


def _grid_indices(shape):
    """Per-pixel image row and column indices, and the image shape."""
    if len(shape) == 2:
        rows, cols = np.indices(shape)
        return rows, cols, tuple(shape)
    n, pr, pc = shape
    grid_cols = math.ceil(math.sqrt(n))
    grid_rows = math.ceil(n / grid_cols)
    panel = np.arange(n)[:, None, None]
    r, c = np.indices((pr, pc))
    rows = (panel // grid_cols) * (pr + GAP) + r
    cols = (panel % grid_cols) * (pc + GAP) + c
    return rows, cols, (grid_rows * (pr + GAP) - GAP, grid_cols * (pc + GAP) - GAP)


class AreaDetector:
    def __init__(self, alias, config, env):
        self._alias = alias
        self._config = config
        self._env = env
        self._shape = tuple(config["shape"])
        self._missing = set(config.get("missing", ()))
        path = os.path.join(env.calib_dir, f"{alias}.json")
        self._constants = None
        self._status = DEFAULT
        if os.path.exists(path):
            with open(path) as f:
                self._constants = json.load(f)
            self._status = LOADED
        elif config.get("full_name", alias).split(":")[-1].startswith(FIXED_SIZE):
            self._constants = {"pedestal": 0.0, "gain": 1.0}

    def _raw_value(self, evt):
        n = int(np.prod(self._shape))
        flat = (np.arange(n, dtype=np.int64) + STEP * evt.index) % PERIOD
        return flat.astype(np.uint16).reshape(self._shape)

    def _present(self, evt):
        return evt is not None and evt.index not in self._missing

    def _constant(self, name):
        if self._constants is None:
            return None
        return np.full(self._shape, self._constants[name], np.float32)

    def shape(self, par=0):
        return np.array(self._shape)

    def raw(self, evt):
        if not self._present(evt):
            return None
        return self._raw_value(evt) | np.uint16(self._config.get("gain_bits", 0))

    def pedestals(self, par):
        return self._constant("pedestal")

    def loading_status(self, par, calibtype=None):
        return self._status

    def gain(self, par):
        return self._constant("gain")

    def calib(self, evt, cmpars=None, mbits=1):
        if not self._present(evt):
            return None
        raw = self._raw_value(evt).astype(np.float32)
        if self._constants is None:
            return raw
        return (raw - self._constants["pedestal"]) * np.float32(self._constants["gain"])

    def coords_x(self, par):
        if not self._config.get("geometry"):
            return None
        return _grid_indices(self._shape)[0] * PIXEL_UM

    def image_xaxis(self, par):
        if not self._config.get("geometry"):
            return None
        return np.arange(_grid_indices(self._shape)[2][0]) * PIXEL_UM

    def image_yaxis(self, par):
        if not self._config.get("geometry"):
            return None
        return np.arange(_grid_indices(self._shape)[2][1]) * PIXEL_UM

    def image(self, evt, nda_in=None):
        if not self._config.get("geometry"):
            return None
        data = self.calib(evt) if nda_in is None else np.asarray(nda_in)
        if data is None:
            return None
        rows, cols, shape = _grid_indices(self._shape)
        image = np.zeros(shape, data.dtype)
        image[rows, cols] = data.reshape(self._shape)
        return image

    def mask(self, par, calib=False, status=False, edges=False):
        """None unless a mask is asked for; status marks the first pixel of
        every panel bad when constants exist (psana1's default status is
        all good), edges masks every panel's outer ring."""
        if not (calib or status or edges):
            return None
        mask = np.ones(self._shape, np.uint8)
        if status and self._status == LOADED:
            mask[..., 0, 0] = 0
        if edges:
            mask[..., 0, :] = mask[..., -1, :] = 0
            mask[..., :, 0] = mask[..., :, -1] = 0
        return mask
