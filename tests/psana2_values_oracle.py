"""psana's own answers for a list of events, made with psana directly and not
through psana-ipc: the reference every frame and field value the psana2
source serves must equal. Runs in the psana environment:

    python psana2_values_oracle.py DATA_DIR CALIB_DIR EXP RUN SPEC.json OUT.npz

SPEC.json: {"events": [...], "calls": [[detector, interface, method], ...],
"pvs": [EPICS variable, ...]} (e.g. ["epix10k2M", "raw", "calib"], ["ebeam",
"raw", "ebeamPhotonEnergy"]; "HX2_DVD_GCC_01_PMON").
OUT.npz holds "<detector>.<interface>.<method>/<event>" for every call psana
answered (np.asarray of its answer); a call psana answered None for is
absent, and so is one that failed in an event without the detector (psana's
cspad class raises TypeError there instead of returning None). PVs are read
as "epics.<variable>/<event>" with `run.Detector(variable)(evt)` in a
sequential pass over the run (psana's own lookup is right only there).
CALIB_DIR/<detector>/ holds pedestals.npy, pixel_gain.npy and optionally
geometry.txt, handed to psana for the detectors that have them.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ["PS_PARALLEL"] = "none"
from psana import DataSource  # noqa: E402
from psana.psexp.ds_base import DataSourceBase  # noqa: E402


def constants(folder: Path, meta: dict) -> dict:
    found = {ctype: (np.load(folder / f"{ctype}.npy"), meta)
             for ctype in ("pedestals", "pixel_gain") if (folder / f"{ctype}.npy").exists()}
    if (folder / "geometry.txt").exists():
        found["geometry"] = ((folder / "geometry.txt").read_text(), meta)
    return found


def main(data_dir: str, calib_dir: str, exp: str, run: str, spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}  # no logbook: list data_dir
    ds = DataSource(exp=exp, run=int(run), dir=data_dir, skip_calib_load="all")
    psana_run = next(ds.runs())
    meta = {"experiment": exp, "run": int(run)}
    names = {det for det, _, _ in spec["calls"]}
    for det in names:
        psana_run.dsparms.calibconst[det] = constants(Path(calib_dir) / det, meta)
    dets = {det: psana_run.Detector(det) for det in names}
    with psana_run.build_table():
        timestamps = list(psana_run._ts_table)
    answers = {}
    for event in spec["events"]:
        evt = psana_run.event(timestamps[event])
        for det, iface, method in spec["calls"]:
            try:
                value = getattr(getattr(dets[det], iface), method)(evt)
            except TypeError:
                if (det, iface) in evt._det_segments:
                    raise
                value = None
            if value is not None:
                answers[f"{det}.{iface}.{method}/{event}"] = np.asarray(value)
    answers.update(pv_answers(data_dir, exp, int(run), spec.get("pvs", []), spec["events"]))
    np.savez(out, **answers)


def pv_answers(data_dir: str, exp: str, run: int, pvs: list, events: list) -> dict:
    ds = DataSource(exp=exp, run=run, dir=data_dir, skip_calib_load="all")
    psana_run = next(ds.runs())
    dets = {pv: psana_run.Detector(pv) for pv in pvs}
    answers = {}
    for event, evt in enumerate(psana_run.events()):
        for pv, det in dets.items():
            value = det(evt)
            if event in events and value is not None:
                answers[f"epics.{pv}/{event}"] = np.asarray(value)
    return answers


if __name__ == "__main__":
    main(*sys.argv[1:])
