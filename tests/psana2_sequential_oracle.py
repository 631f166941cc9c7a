"""psana's own sequential read of a run, made with psana directly and not
through psana-ipc: every event's timestamp and the raw frame of each
detector, in file order. Runs in the psana environment:

    python psana2_sequential_oracle.py DATA_DIR EXP RUN DETECTOR[,DETECTOR...] OUT.npz

OUT.npz holds `timestamps` (uint64) and, per detector, its name: (events, ...).
"""
import os
import sys

import numpy as np

os.environ["PS_PARALLEL"] = "none"
from psana import DataSource  # noqa: E402
from psana.psexp.ds_base import DataSourceBase  # noqa: E402


def main(data_dir: str, exp: str, run: str, detectors: str, out: str) -> None:
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}  # no logbook: list data_dir
    ds = DataSource(exp=exp, run=int(run), dir=data_dir, skip_calib_load="all")
    psana_run = next(ds.runs())
    dets = {name: psana_run.Detector(name) for name in detectors.split(",")}
    timestamps, frames = [], {name: [] for name in dets}
    for evt in psana_run.events():
        timestamps.append(evt.timestamp)
        for name, det in dets.items():
            frames[name].append(det.raw.raw(evt))
    np.savez(out, timestamps=np.array(timestamps, np.uint64),
             **{name: np.array(raws) for name, raws in frames.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
