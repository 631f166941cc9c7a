"""The area detectors our XTC2 writer (make_xtc2_run.py) makes: psana's type
and version for each, and the constants psana calibrates them with, written
as `iserver --calib-dir` reads them (see make_xtc2_run.py's docstring)."""
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from psana_ipc.server.sources.synthetic import DETECTORS

# name -> psana detector type, version of its `raw` data (psana picks the class
# <type>_raw_<major>_<minor>_<micro>) and gain ranges its constants hold
PSANA_TYPES = {
    "epix10k2M": ("epix10ka", (2, 0, 1), 7),
    "jungfrau4M": ("jungfrau", (0, 2, 0), 3),
}
# Panel pitch and detector distance of the epix10k2M test geometry, in micrometres.
PITCH_X, PITCH_Y, DISTANCE = 45000, 42000, 100000


def epix10k2m_geometry() -> str:
    """psana geometry text placing 16 EPIX10KA:V1 panels on a 4x4 grid."""
    lines = ["# CALIB_TYPE geometry",
             "# test layout: 4x4 epix10ka panels, not a metrology",
             "# HDR PARENT IND OBJECT IND X0[um] Y0[um] Z0[um] ROT-Z ROT-Y ROT-X TILT-Z TILT-Y TILT-X"]
    for seg in range(16):
        row, col = divmod(seg, 4)
        x0, y0 = int((col - 1.5) * PITCH_X), int((1.5 - row) * PITCH_Y)
        lines.append(f"CAMERA 0 EPIX10KA:V1 {seg} {x0} {y0} 0 0 0 0 0.0 0.0 0.0")
    lines.append(f"IP 0 CAMERA 0 0 0 {DISTANCE} 0 0 0 0.0 0.0 0.0")
    return "\n".join(lines) + "\n"


def write_constants(folder: Path, detector: str, pedestal: float, gain: float,
                    bad_pixel_every: int = 0,
                    pixel_offset: Optional[float] = None) -> Dict[str, Path]:
    """A detector's constants in every gain range (see make_xtc2_run.py's
    docstring), and the epix10k2M's geometry; what was written, by type."""
    _, _, ranges = PSANA_TYPES[detector]
    shape = (ranges,) + DETECTORS[detector][0]
    folder.mkdir(parents=True, exist_ok=True)
    written = {"pedestals": folder / "pedestals.npy", "pixel_gain": folder / "pixel_gain.npy"}
    np.save(written["pedestals"], np.full(shape, pedestal, np.float32))
    np.save(written["pixel_gain"], np.full(shape, gain, np.float32))
    if bad_pixel_every:
        written["pixel_status"] = folder / "pixel_status.npy"
        bad = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:]) % bad_pixel_every == 0
        np.save(written["pixel_status"], np.broadcast_to(bad, shape).astype(np.uint64))
    if pixel_offset is not None and detector == "jungfrau4M":
        written["pixel_offset"] = folder / "pixel_offset.npy"
        np.save(written["pixel_offset"], np.full(shape, pixel_offset, np.float32))
    if detector == "epix10k2M":
        written["geometry"] = folder / "geometry.txt"
        written["geometry"].write_text(epix10k2m_geometry())
    return written
