"""psana's own read of a run while our writer grows it, in psana's live mode
(`DataSource(live=True)`, reading in order), made with psana directly and
not through psana-ipc. Runs in the psana environment:

    python psana2_live_oracle.py DATA_DIR CALIB_DIR EXP RUN DETECTOR.METHOD[,...] OUT.npz

psana asks the logbook for a live run's files; here the answer is the
run's chunk-0 files found in DATA_DIR under either name (psana then waits
for them, and for the run to grow, itself). CALIB_DIR/<detector>/ holds
constants as psana2_values_oracle reads them. OUT.npz holds `timestamps`
(uint64) and, per call, "<detector>.<method>" stacked over the events;
OUT.npz.read gets a line as each event is read, for tests to wait on.
"""
import os
import re
import sys
from pathlib import Path

import numpy as np

os.environ["PS_PARALLEL"] = "none"
os.environ["PS_LIVE_FILE_LIST_STABLE_POLLS"] = "1"     # the answer below does not change
from psana import DataSource  # noqa: E402
from psana.psexp.ds_base import DataSourceBase  # noqa: E402

from psana2_values_oracle import constants  # noqa: E402


def run_files(data_dir: str, exp: str, run: int) -> dict:
    """What the logbook would say of the run: its chunk-0 files' final names."""
    pattern = re.compile(rf"{exp}-r{run:04d}-s\d{{3}}-c000\.xtc2(\.inprogress)?")
    names = sorted({name.split(".inprogress")[0] for name in os.listdir(data_dir)
                    if pattern.fullmatch(name)})
    return {"xtc_files": names, "dirname": data_dir} if names else {}


def main(data_dir: str, calib_dir: str, exp: str, run: str, calls: str, out: str) -> None:
    DataSourceBase._get_file_info_from_db = lambda self, runnum: run_files(data_dir, exp, runnum)
    ds = DataSource(exp=exp, run=int(run), dir=data_dir, skip_calib_load="all", live=True)
    psana_run = next(ds.runs())
    wanted = [call.split(".") for call in calls.split(",")]
    meta = {"experiment": exp, "run": int(run)}
    for det in {det for det, _ in wanted}:
        psana_run.dsparms.calibconst[det] = constants(Path(calib_dir) / det, meta)
    dets = {det: psana_run.Detector(det) for det, _ in wanted}
    timestamps, answers = [], {f"{det}.{method}": [] for det, method in wanted}
    with open(out + ".read", "w", buffering=1) as read:
        for evt in psana_run.events():
            timestamps.append(evt.timestamp)
            for det, method in wanted:
                answers[f"{det}.{method}"].append(getattr(dets[det].raw, method)(evt))
            read.write(f"{len(timestamps)}\n")
    np.savez(out, timestamps=np.array(timestamps, np.uint64),
             **{key: np.array(values) for key, values in answers.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
