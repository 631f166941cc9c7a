"""Stand-in psana1 runs for tests: write a run's description and constants
where the stand-in `psana` looks for them, and state what psana1 should
return for it, written out independently of the stand-in."""
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

STANDIN = Path(__file__).resolve().parent   # on PYTHONPATH, `import psana` is the stand-in
EXP, RUN, EVENTS = "mfxp1234", 7, 6
INSTRUMENT = "MFX"      # psana1's name of the experiment's instrument
GAIN_BITS = 0xC000
DETECTORS = {
    "epix10k2M": {"full_name": "MfxEndstation.0:Epix10ka2M.0", "shape": [4, 8, 12],
                  "geometry": True, "gain_bits": GAIN_BITS, "missing": [3]},
    "epix10kaQuad": {"full_name": "MfxEndstation.0:Epix10kaQuad.0", "shape": [2, 6, 10],
                     "geometry": True, "gain_bits": GAIN_BITS},
    "opal": {"full_name": "MfxEndstation.0:Opal1000.0", "shape": [6, 10]},
    "epix100a": {"full_name": "MfxEndstation.0:Epix100a.0", "shape": [6, 8], "missing": [0, 4]},
}
CONSTANTS = {"epix10k2M": {"pedestal": 10.0, "gain": 0.5}}


def write_run(root: Path, events: int = EVENTS) -> Path:
    """Run EXP/RUN under data root `root` (what SIT_PSDM_DATA names), with
    CONSTANTS in the experiment's calib dir; returns the xtc dir."""
    xtc = root / INSTRUMENT / EXP / "xtc"
    xtc.mkdir(parents=True)
    (xtc / f"{EXP}-r{RUN:04d}.json").write_text(json.dumps({"events": events,
                                                            "detectors": DETECTORS}))
    write_constants(experiment_calib_dir(root), CONSTANTS)
    return xtc


def experiment_calib_dir(root: Path) -> Path:
    """psana1's default calib dir under data root `root`."""
    return root / INSTRUMENT / EXP / "calib"


def write_constants(calib_dir: Path, constants: Dict[str, Dict[str, float]]) -> Path:
    calib_dir.mkdir(parents=True, exist_ok=True)
    for detector, values in constants.items():
        (calib_dir / f"{detector}.json").write_text(json.dumps(values))
    return calib_dir


def raw_of(detector: str, event: int, gain_bits: bool = True) -> np.ndarray:
    shape = DETECTORS[detector]["shape"]
    values = [(i + 101 * event) % 16384 for i in range(int(np.prod(shape)))]
    raw = np.array(values, np.uint16).reshape(shape)
    return raw | DETECTORS[detector].get("gain_bits", 0) if gain_bits else raw


def calib_of(detector: str, event: int, constants: Optional[Dict[str, float]] = None) -> np.ndarray:
    constants = constants or CONSTANTS[detector]
    raw = raw_of(detector, event, gain_bits=False).astype(np.float32)
    return (raw - np.float32(constants["pedestal"])) * np.float32(constants["gain"])


def image_of(panels: np.ndarray) -> np.ndarray:
    """Panels on a near-square grid, two pixels apart, row by row."""
    n, rows, cols = panels.shape
    per_row = int(np.ceil(np.sqrt(n)))
    grid_rows = -(-n // per_row)
    image = np.zeros((grid_rows * (rows + 2) - 2, per_row * (cols + 2) - 2), panels.dtype)
    for k in range(n):
        top, left = (k // per_row) * (rows + 2), (k % per_row) * (cols + 2)
        image[top:top + rows, left:left + cols] = panels[k]
    return image


def timestamp_of(event: int) -> Dict[str, int]:
    seconds = 1500000000 + event // 120
    nanoseconds = (event % 120) * 8333333
    return {"time": seconds << 32 | nanoseconds, "seconds": seconds,
            "nanoseconds": nanoseconds, "fiducial": 0x3000 + 3 * event}
