"""What the psana2 tests share: the psana environment's python and the XTC2
runs they read, written once per session with psana's own writer by
scripts/make_xtc2_run.py (in that environment; pytest's has no psana)."""
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import pytest

from psana_ipc.server.sources.synthetic import expected

ROOT = Path(__file__).resolve().parents[1]
EXP = "tstx00117"
DETECTORS = ("epix10k2M", "jungfrau4M")
RUN, EVENTS = 1, 12             # constants for all runs: pedestal 10, gain 2
OTHER_RUN, OTHER_EVENTS = 2, 4  # its own constants: pedestal 20, gain 4
GAIN_BITS_RUN = 3               # epix10k2M only, every pixel's gain bits set
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
    for detector in DETECTORS:
        folder = runs.no_geometry / detector
        folder.mkdir(parents=True)
        for name in ("pedestals.npy", "pixel_gain.npy"):
            (folder / name).symlink_to(runs.calib_dir / detector / name)
    return runs


CHUNKED_RUN, CHUNKED_EVENTS, CHUNK_EVENTS = 5, 5, 2      # both detectors in chunks of 2 events
CORRUPT_RUN, CORRUPT_EVENTS, CORRUPT_EVENT = 6, 5, 3     # chunks of 2, event 3 damaged
OTHER_EXP = "tstx00118"
SHARED_RUN = 7                                           # of EXP and of OTHER_EXP
SHARED_EVENTS = {EXP: 3, OTHER_EXP: 2}


@dataclass(frozen=True)
class ChunkedRuns:
    data_dir: Path        # CHUNKED_RUN and CORRUPT_RUN (epix10k2M only) of EXP

    def chunks(self, run: int, stream: int = 0) -> List[Path]:
        return sorted(self.data_dir.glob(f"{EXP}-r{run:04d}-s{stream:03d}-c*.xtc2"))


@pytest.fixture(scope="session")
def psana2_chunked(tmp_path_factory) -> ChunkedRuns:
    runs = ChunkedRuns(tmp_path_factory.mktemp("psana2-chunked"))
    common = [str(ROOT / "scripts" / "make_xtc2_run.py"), "--outdir", str(runs.data_dir),
              "--exp", EXP]
    run_psana(common + ["--run", str(CHUNKED_RUN), "-n", str(CHUNKED_EVENTS),
                        "--chunk-events", str(CHUNK_EVENTS)])
    run_psana(common + ["--run", str(CORRUPT_RUN), "-n", str(CORRUPT_EVENTS),
                        "--detectors", "epix10k2M", "--chunk-events", "2",
                        "--corrupt-event", str(CORRUPT_EVENT)])
    return runs


@dataclass(frozen=True)
class SharedRuns:
    shared: Path      # SHARED_RUN of EXP and of OTHER_EXP side by side
    facility: Path    # the same files as ROOT/tst/EXP/xtc and ROOT/TST/OTHER_EXP/xtc

    def files(self, exp: str) -> List[Path]:
        return sorted(self.shared.glob(f"{exp}-r{SHARED_RUN:04d}-*.xtc2"))


@pytest.fixture(scope="session")
def psana2_shared(tmp_path_factory) -> SharedRuns:
    root = tmp_path_factory.mktemp("psana2-shared")
    runs = SharedRuns(root / "shared", root / "facility")
    for exp, events in SHARED_EVENTS.items():
        run_psana([str(ROOT / "scripts" / "make_xtc2_run.py"), "--outdir", str(runs.shared),
                   "--exp", exp, "--run", str(SHARED_RUN), "-n", str(events),
                   "--detectors", "epix10k2M"])
    for exp, instrument in ((EXP, "tst"), (OTHER_EXP, "TST")):
        xtc = runs.facility / instrument / exp / "xtc"
        (xtc / "smalldata").mkdir(parents=True)
        for path in runs.files(exp):
            (xtc / path.name).symlink_to(path)
            smd = path.name.replace(".xtc2", ".smd.xtc2")
            (xtc / "smalldata" / smd).symlink_to(runs.shared / "smalldata" / smd)
    return runs


CONSTANTS_RUN, CONSTANTS_EVENTS = 9, 2
PEDESTAL, GAIN, BAD_PIXEL_EVERY, PIXEL_OFFSET = 10.0, 2.0, 97, 3.0


@dataclass(frozen=True)
class ConstantsRun:
    data_dir: Path     # CONSTANTS_RUN of EXP, both detectors
    calib_dir: Path    # pedestals, pixel_gain, pixel_status; jungfrau4M pixel_offset; geometry


@pytest.fixture(scope="session")
def psana2_constants(tmp_path_factory) -> ConstantsRun:
    root = tmp_path_factory.mktemp("psana2-constants")
    run = ConstantsRun(root / "xtc", root / "calib")
    run_psana([str(ROOT / "scripts" / "make_xtc2_run.py"), "--outdir", str(run.data_dir),
               "--exp", EXP, "--run", str(CONSTANTS_RUN), "-n", str(CONSTANTS_EVENTS),
               "--calib-dir", str(run.calib_dir), "--pedestal", str(PEDESTAL), "--gain", str(GAIN),
               "--bad-pixel-every", str(BAD_PIXEL_EVERY),
               "--pixel-offset", str(PIXEL_OFFSET)])
    return run
