"""psana's own answers for a list of events, made with psana directly and not
through psana-ipc: the reference every frame and field value the psana2
source serves must equal. Runs in the psana environment:

    python psana2_values_oracle.py DATA_DIR CALIB_DIR EXP RUN SPEC.json OUT.npz

SPEC.json: {"events": [...] or null (all), "calls": [[detector, interface, method], ...],
"env": [[store, variable], ...], "steps": bool, "intg_det": detector or null}
(e.g. ["epix10k2M", "raw", "calib"], ["ebeam", "raw", "ebeamPhotonEnergy"];
["epics", "HX2_DVD_GCC_01_PMON"], ["scan", "motor1"]).

OUT.npz holds "<detector>.<interface>.<method>/<event>" for every call psana
answered (np.asarray of its answer). A dictionary (a digitizer's channels)
is flattened into keys "<call>/<event>/<key>/<key>...", a list or tuple
holding arrays into ".../<position>", leaving out psana's "times" (its
sample clock); a named tuple goes to OUT.json's "records" with its members'
exact values. A call psana answered None for is absent, and so is one that
raised (OUT.json's "errors" names the exception, e.g. psana's cspad class
raises TypeError in an event without the detector). Variables are read as
"<store>.<variable>/<event>" with `run.Detector(variable)(evt)` in a
sequential pass over the run (psana's own lookup is right only there).
With "steps", OUT.json's "steps" lists each step's events (`run.steps()`);
with "intg_det", "batches" lists the events of each batch psana's
`DataSource(intg_det=...)` ends with `evt.EndOfBatch()`, and "open" those
after the last batch. OUT.json also says which events psana holds each
called detector's data in ("held": `det.<interface>._segments(evt)` is not
None, i.e. every segment is there), and lists the run's detectors
("detnames") and its EPICS and scan variables ("variables", as
`run.epicsinfo` and `run.scaninfo` name them). CALIB_DIR/<detector>/ holds pedestals.npy,
pixel_gain.npy and optionally geometry.txt, handed to psana for the
detectors that have them.
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


def exact(value):
    """A named tuple's member as JSON keeps it (numpy scalars as Python's)."""
    return value.item() if isinstance(value, np.generic) else value


def flatten(key: str, value, answers: dict, records: dict) -> None:
    if isinstance(value, dict):
        for part, inner in value.items():
            if part != "times":
                flatten(f"{key}/{part}", inner, answers, records)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        records[key] = {field: exact(v) for field, v in zip(value._fields, value)}
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple, np.ndarray))
                                                  for v in value):
        for position, inner in enumerate(value):
            flatten(f"{key}/{position}", inner, answers, records)
    else:
        answers[key] = np.asarray(value)


def open_run(data_dir: str, exp: str, run: int, **kwargs):
    """The DataSource and its run: the run reads nothing once its DataSource is gone."""
    ds = DataSource(exp=exp, run=run, dir=data_dir, skip_calib_load="all", **kwargs)
    return ds, next(ds.runs())


def main(data_dir: str, calib_dir: str, exp: str, run: str, spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}  # no logbook: list data_dir
    ds, psana_run = open_run(data_dir, exp, int(run))
    meta = {"experiment": exp, "run": int(run)}
    names = {det for det, _, _ in spec["calls"]}
    for det in names:
        psana_run.dsparms.calibconst[det] = constants(Path(calib_dir) / det, meta)
    dets = {det: psana_run.Detector(det) for det in names}
    with psana_run.build_table():
        timestamps = list(psana_run._ts_table)
    events = spec["events"] if spec["events"] is not None else list(range(len(timestamps)))
    answers, records, errors = {}, {}, {}
    held = {f"{det}.{iface}": [] for det, iface, _ in spec["calls"]}
    for event in events:
        evt = psana_run.event(timestamps[event])
        for name in held:
            det, iface = name.split(".")
            if getattr(dets[det], iface)._segments(evt) is not None:
                held[name].append(event)
        for det, iface, method in spec["calls"]:
            key = f"{det}.{iface}.{method}/{event}"
            try:
                value = getattr(getattr(dets[det], iface), method)(evt)
            except Exception as e:
                errors[key] = type(e).__name__
                continue
            if value is not None:
                flatten(key, value, answers, records)
    index = {ts: i for i, ts in enumerate(timestamps)}
    answers.update(env_answers(data_dir, exp, int(run), spec.get("env", []), events))
    found = {"timestamps": timestamps, "events": events, "records": records, "errors": errors,
             "held": held,
             "detnames": sorted(psana_run.detnames),
             "variables": {"epics": sorted({var for var, _ in psana_run.epicsinfo}),
                           "scan": sorted({var for var, _ in psana_run.scaninfo})}}
    if spec.get("steps"):
        ds, stepped = open_run(data_dir, exp, int(run))
        found["steps"] = [[index[evt.timestamp] for evt in step.events()]
                          for step in stepped.steps()]
    if spec.get("intg_det"):
        found.update(batches(data_dir, exp, int(run), spec["intg_det"], index))
    np.savez(out, **answers)
    Path(out).with_suffix(".json").write_text(json.dumps(found))


def env_answers(data_dir: str, exp: str, run: int, variables: list, events: list) -> dict:
    ds, psana_run = open_run(data_dir, exp, run)
    dets = {(store, var): psana_run.Detector(var) for store, var in variables}
    answers = {}
    for event, evt in enumerate(psana_run.events()):
        for (store, var), det in dets.items():
            value = det(evt)
            if event in events and value is not None:
                answers[f"{store}.{var}/{event}"] = np.asarray(value)
    return answers


def batches(data_dir: str, exp: str, run: int, intg_det: str, index: dict) -> dict:
    """The events of each batch of an integrating detector's run, read as
    psana reads it (`DataSource(intg_det=...)`, `evt.EndOfBatch()`)."""
    done, current = [], []
    ds, psana_run = open_run(data_dir, exp, run, intg_det=intg_det)
    for evt in psana_run.events():
        current.append(index[evt.timestamp])
        if evt.EndOfBatch():
            done.append(current)
            current = []
    return {"batches": done, "open": current}


if __name__ == "__main__":
    main(*sys.argv[1:])
