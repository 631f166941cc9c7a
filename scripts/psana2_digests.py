#!/usr/bin/env python
"""psana's own read of a finished run, in order, as digests: what a
benchmark compares the frames it was served with, without keeping them.
Run it with the psana environment:

    .venv-psana/bin/python scripts/psana2_digests.py DATA_DIR CALIB_DIR EXP RUN DET.METHOD[,...]

Prints one JSON line per event: {"event", "time", "<det>.<method>": digest},
the digest being `digest(array)` of psana's answer (`det.raw.<method>(evt)`,
None where psana gives none). CALIB_DIR/<detector>/ may hold pedestals.npy,
pixel_gain.npy and geometry.txt (as make_xtc2_run.py --calib-dir writes
them), handed to psana as its calibration database would.
"""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


def digest(array: Optional[Any]) -> Optional[str]:
    """A digest of an array's type, shape and bytes (SHA-1: it tells arrays
    apart, and hashes a 17 MB calib frame in a few milliseconds)."""
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    found = hashlib.sha1(f"{array.dtype.str}{array.shape}".encode())
    found.update(memoryview(array).cast("B"))
    return found.hexdigest()


def constants(folder: Path, meta: Dict[str, Any]) -> Dict[str, Any]:
    found = {ctype: (np.load(folder / f"{ctype}.npy"), meta)
             for ctype in ("pedestals", "pixel_gain") if (folder / f"{ctype}.npy").exists()}
    if (folder / "geometry.txt").exists():
        found["geometry"] = ((folder / "geometry.txt").read_text(), meta)
    return found


def main(data_dir: str, calib_dir: str, exp: str, run: str, calls: str) -> None:
    os.environ["PS_PARALLEL"] = "none"
    from psana import DataSource
    from psana.psexp.ds_base import DataSourceBase
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}   # no logbook: list DATA_DIR
    ds = DataSource(exp=exp, run=int(run), dir=data_dir, skip_calib_load="all")
    psana_run = next(ds.runs())
    wanted = [call.split(".") for call in calls.split(",")]
    for det in {det for det, _ in wanted}:
        psana_run.dsparms.calibconst[det] = constants(Path(calib_dir) / det,
                                                      {"experiment": exp, "run": int(run)})
    dets = {det: psana_run.Detector(det) for det, _ in wanted}
    for event, evt in enumerate(psana_run.events()):
        line = {"event": event, "time": int(evt.timestamp)}
        line.update({f"{det}.{method}": digest(getattr(dets[det].raw, method)(evt))
                     for det, method in wanted})
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
