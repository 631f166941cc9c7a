"""psana's own image (or calib, or mask) of one event, made with psana
directly and not through psana-ipc: the reference the psana2 source's frame
must equal. Runs in the psana environment:

    python psana2_image_oracle.py DATA_DIR CALIB_DIR EXP RUN DETECTOR EVENT OUT.npz [MODES]

CALIB_DIR/DETECTOR holds one <constant type>.npy per type (pedestals.npy,
pixel_gain.npy, pixel_status.npy, ...) and optionally geometry.txt (else
psana's default geometry is used). MODES, comma-separated, from image (the
default), calib and mask; OUT.npz holds one array per mode.
"""
import os
import sys
from pathlib import Path

import numpy as np

os.environ["PS_PARALLEL"] = "none"
from psana import DataSource  # noqa: E402
from psana.psexp.ds_base import DataSourceBase  # noqa: E402


def main(data_dir: str, calib_dir: str, exp: str, run: str, detector: str, event: str,
         out: str, modes: str = "image") -> None:
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}  # no logbook: list data_dir
    ds = DataSource(exp=exp, run=int(run), dir=data_dir, skip_calib_load="all")
    psana_run = next(ds.runs())
    folder = Path(calib_dir) / detector
    meta = {"experiment": exp, "run": int(run)}
    constants = {path.stem: (np.load(path), meta) for path in folder.glob("*.npy")}
    if (folder / "geometry.txt").exists():
        constants["geometry"] = ((folder / "geometry.txt").read_text(), meta)
    psana_run.dsparms.calibconst[detector] = constants
    det = psana_run.Detector(detector)
    with psana_run.build_table():
        timestamp = list(psana_run._ts_table)[int(event)]
    evt = psana_run.event(timestamp)
    frames = {"image": lambda: det.raw.image(evt), "calib": lambda: det.raw.calib(evt),
              "mask": lambda: det.raw._mask()}
    np.savez(out, **{mode: frames[mode]() for mode in modes.split(",")})


if __name__ == "__main__":
    main(*sys.argv[1:])
