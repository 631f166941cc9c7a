"""What the psana2 tests share: the psana environment's python and the XTC2
runs they read, written once per session with psana's own writer by
scripts/make_xtc2_run.py (in that environment; pytest's has no psana)."""
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from psana_ipc.server.sources.synthetic import expected

ROOT = Path(__file__).resolve().parents[1]
EXP = "tstx00117"
DETECTORS = ("epix10k2M", "jungfrau4M")
RUN, EVENTS = 1, 12             # constants for all runs: pedestal 10, gain 2
OTHER_RUN, OTHER_EVENTS = 2, 4  # its own constants: pedestal 20, gain 4
GAIN_BITS_RUN = 3               # epix10k2M only, every pixel's gain bits set
# A run shaped like DAQ output: area detectors, BLD scalars and a wave8 at
# mixed rates. event:      0  1  2  3  4  5
MIXED_RUN, MIXED_EVENTS = 4, 6  # epix10k2M, ebeam: every event
MIXED_RATES = {"jungfrau4M": "2:1",   #  .  x  .  x  .  x
               "gasdet": "2",         #  x  .  x  .  x  .
               "wave8": "3:1",        #  .  x  .  .  x  .
               "cspad": "3"}          #  x  .  .  x  .  .   (no _mask in psana's class)
# and EPICS PVs, updated in SlowUpdates before events 0, 2, 4
MIXED_DETECTORS = ("epix10k2M", "jungfrau4M", "ebeam", "gasdet", "wave8", "cspad", "epics")
PVS = ("HX2_DVD_GCC_01_PMON", "XPP_VARS_FLOAT_02")
# what psana is asked for each event of the mixed run: (detector, interface, method)
ORACLE_CALLS = (("epix10k2M", "raw", "raw"), ("epix10k2M", "raw", "calib"),
                ("jungfrau4M", "raw", "raw"), ("cspad", "raw", "raw"),
                ("cspad", "raw", "calib"), ("wave8", "raw", "raw_all"),
                ("wave8", "raw", "raw_3"), ("ebeam", "raw", "ebeamPhotonEnergy"),
                ("ebeam", "raw", "ebeamCharge"), ("ebeam", "raw", "damageMask"),
                ("gasdet", "raw", "f_11_ENRC"), ("gasdet", "raw", "f_21_ENRC"))
CONSTANTS = {RUN: (10.0, 2.0), OTHER_RUN: (20.0, 4.0)}


def psana_python() -> str:
    """The psana environment's python; its absence fails a test, never skips it."""
    path = os.environ.get("PSANA_IPC_PSANA_PYTHON", str(ROOT / ".venv-psana" / "bin" / "python"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"no psana python at {path}: build it with `scripts/setup_envs.sh psana`")
    return path


def run_psana(args: List[str]) -> str:
    done = subprocess.run([psana_python()] + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def calib_of(detector: str, run: int, event: int) -> np.ndarray:
    pedestal, gain = CONSTANTS[run]
    return (expected(detector, "raw", event).astype(np.float32) - pedestal) / gain


@dataclass(frozen=True)
class Runs:
    data_dir: Path
    calib_dir: Path       # constants for every run, run 2's own, epix10k2M geometry
    no_geometry: Path     # run 1's constants without the epix10k2M geometry

    def server_args(self, calib_dir: Path = None, workers: int = 1) -> List[str]:
        args = ["--source", "psana2", "--workers", str(workers), "--offline",
                "--data-dir", str(self.data_dir)]
        return args + (["--calib-dir", str(calib_dir)] if calib_dir else [])


@pytest.fixture(scope="session")
def psana2_runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("psana2")
    runs = Runs(root / "xtc", root / "calib", root / "calib-no-geometry")
    script = str(ROOT / "scripts" / "make_xtc2_run.py")
    common = [script, "--outdir", str(runs.data_dir), "--exp", EXP]
    for run, events in ((RUN, EVENTS), (OTHER_RUN, OTHER_EVENTS)):
        pedestal, gain = CONSTANTS[run]
        run_psana(common + ["--run", str(run), "-n", str(events), "--calib-dir", str(runs.calib_dir),
                            "--pedestal", str(pedestal), "--gain", str(gain)]
                  + (["--per-run"] if run != RUN else []))
    run_psana(common + ["--run", str(GAIN_BITS_RUN), "-n", "2", "--detectors", "epix10k2M",
                        "--gain-bits"])
    run_psana(common + ["--run", str(MIXED_RUN), "-n", str(MIXED_EVENTS), "--detectors",
                        *MIXED_DETECTORS]
              + [f"--rate={det}={rate}" for det, rate in MIXED_RATES.items()])
    for detector in DETECTORS:
        folder = runs.no_geometry / detector
        folder.mkdir(parents=True)
        for name in ("pedestals.npy", "pixel_gain.npy"):
            (folder / name).symlink_to(runs.calib_dir / detector / name)
    return runs


@pytest.fixture(scope="session")
def mixed_oracle(psana2_runs, tmp_path_factory) -> Dict[str, np.ndarray]:
    """psana's own answer to every ORACLE_CALLS call in every event of the
    mixed run, keyed "<detector>.<interface>.<method>/<event>"; a call psana
    answers None for is absent."""
    folder = tmp_path_factory.mktemp("oracle")
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"events": list(range(MIXED_EVENTS)),
                                "calls": [list(call) for call in ORACLE_CALLS],
                                "pvs": list(PVS)}))
    out = folder / "answers.npz"
    run_psana([str(ROOT / "tests" / "psana2_values_oracle.py"), str(psana2_runs.data_dir),
               str(psana2_runs.calib_dir), EXP, str(MIXED_RUN), str(spec), str(out)])
    with np.load(out) as answers:
        return dict(answers)
