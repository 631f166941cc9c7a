"""psana's own image of one event, made with psana directly and not through
psana-ipc: the reference the psana2 source's image must equal. Runs in the
psana environment:

    python psana2_image_oracle.py DATA_DIR CALIB_DIR EXP RUN DETECTOR EVENT OUT.npy

CALIB_DIR/DETECTOR holds pedestals.npy, pixel_gain.npy and optionally
geometry.txt (else psana's default geometry is used).
"""
import os
import sys
from pathlib import Path

import numpy as np

os.environ["PS_PARALLEL"] = "none"
from psana import DataSource  # noqa: E402
from psana.psexp.ds_base import DataSourceBase  # noqa: E402


def main(data_dir: str, calib_dir: str, exp: str, run: str, detector: str, event: str,
         out: str) -> None:
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}  # no logbook: list data_dir
    ds = DataSource(exp=exp, run=int(run), dir=data_dir, skip_calib_load="all")
    psana_run = next(ds.runs())
    folder = Path(calib_dir) / detector
    meta = {"experiment": exp, "run": int(run)}
    constants = {ctype: (np.load(folder / f"{ctype}.npy"), meta)
                 for ctype in ("pedestals", "pixel_gain")}
    if (folder / "geometry.txt").exists():
        constants["geometry"] = ((folder / "geometry.txt").read_text(), meta)
    psana_run.dsparms.calibconst[detector] = constants
    det = psana_run.Detector(detector)
    with psana_run.build_table():
        timestamp = list(psana_run._ts_table)[int(event)]
    np.save(out, det.raw.image(psana_run.event(timestamp)))


if __name__ == "__main__":
    main(*sys.argv[1:])
