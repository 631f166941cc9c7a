"""What the psana2 tests share: the psana environment's python and the XTC2
runs they read, written once per session with psana's own writer by
scripts/make_xtc2_run.py (in that environment; pytest's has no psana)."""
import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

from psana_ipc.protocol.errors import ServerError
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


def assert_same(served: np.ndarray, reference: np.ndarray) -> None:
    """Byte-identical: the same type, shape and bytes."""
    served = np.asarray(served)
    assert (served.dtype, served.shape) == (reference.dtype, reference.shape)
    assert served.tobytes() == reference.tobytes()


def error_of(call, *args, **kwargs) -> ServerError:
    with pytest.raises(ServerError) as e:
        call(*args, **kwargs)
    return e.value


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


def written_once(tmp_path_factory, name: str, write: Callable[[Path], None]) -> Path:
    """A folder of runs that several test modules read, written by the first
    pytest process of a parallel run that asks (the others wait, then read
    it): each would otherwise run psana's writer for the same runs."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent                    # the run's, shared by its processes
    root, written = base / name, base / f"{name}.written"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not written.exists():
            shutil.rmtree(root, ignore_errors=True)   # what a failed write left
            root.mkdir()
            write(root)
            written.touch()
    return root


def _runs_in(root: Path) -> Runs:
    return Runs(root / "xtc", root / "calib", root / "calib-no-geometry")


@pytest.fixture(scope="session")
def psana2_runs(tmp_path_factory) -> Runs:
    return _runs_in(written_once(tmp_path_factory, "psana2", _write_runs))


def _write_runs(root: Path) -> None:
    runs = _runs_in(root)
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


@dataclass(frozen=True)
class Answers:
    """psana's answers, as tests/psana2_values_oracle.py writes them."""
    arrays: Dict[str, np.ndarray]     # "<det>.<iface>.<method>/<event>[/...]"
    found: dict                       # timestamps, events, records, errors, held, steps, ...

    def get(self, key: str):
        return self.arrays.get(key)

    def parts(self, key: str) -> Dict[str, np.ndarray]:
        """A flattened answer's arrays, by the rest of their key."""
        return {k[len(key) + 1:]: v for k, v in self.arrays.items() if k.startswith(key + "/")}


def oracle_answers(data_dir: Path, calib_dir: Path, exp: str, run: int, spec: dict,
                   folder: Path) -> Answers:
    """psana's own answers for a run, made in the psana environment by
    tests/psana2_values_oracle.py (see there for `spec`)."""
    (folder / "spec.json").write_text(json.dumps(spec))
    out = folder / "answers.npz"
    run_psana([str(ROOT / "tests" / "psana2_values_oracle.py"), str(data_dir), str(calib_dir),
               exp, str(run), str(folder / "spec.json"), str(out)])
    with np.load(out) as answers:
        return Answers(dict(answers), json.loads(out.with_suffix(".json").read_text()))


@pytest.fixture(scope="session")
def mixed_oracle(psana2_runs, tmp_path_factory) -> Answers:
    """psana's own answer to every ORACLE_CALLS call in every event of the
    mixed run, keyed "<detector>.<interface>.<method>/<event>"; a call psana
    answers None for is absent."""
    spec = {"events": list(range(MIXED_EVENTS)), "calls": [list(call) for call in ORACLE_CALLS],
            "env": [["epics", pv] for pv in PVS]}
    return oracle_answers(psana2_runs.data_dir, psana2_runs.calib_dir, EXP, MIXED_RUN, spec,
                          tmp_path_factory.mktemp("oracle"))


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
    return ChunkedRuns(written_once(tmp_path_factory, "psana2-chunked", _write_chunked))


def _write_chunked(data_dir: Path) -> None:
    common = [str(ROOT / "scripts" / "make_xtc2_run.py"), "--outdir", str(data_dir),
              "--exp", EXP]
    run_psana(common + ["--run", str(CHUNKED_RUN), "-n", str(CHUNKED_EVENTS),
                        "--chunk-events", str(CHUNK_EVENTS)])
    run_psana(common + ["--run", str(CORRUPT_RUN), "-n", str(CORRUPT_EVENTS),
                        "--detectors", "epix10k2M", "--chunk-events", "2",
                        "--corrupt-event", str(CORRUPT_EVENT)])


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


# lcls2's own test runs (tests/data/lcls2, see its README) under the names the
# server finds them by: name -> (exp, run); the single files get small data
# made by psana's smdwriter
LCLS2_DATA = ROOT / "tests" / "data" / "lcls2"
LCLS2_RUNS = {"mixed_rate": ("xpptut15", 14), "multi-seg-epics": ("xpptut15", 15),
              "fakesteps": ("xpptut15", 16), "intg_det": ("xpptut15", 17),
              "test_hsd": ("xpptut15", 18), "test_ts": ("xpptut15", 19),
              "test_timetool": ("xpptut15", 20), "dgramedit-test": ("tmolv9418", 175)}


@dataclass(frozen=True)
class Lcls2Runs:
    data_dir: Path
    calib_dir: Path     # empty: the runs are read without constants

    def server_args(self) -> List[str]:
        return ["--source", "psana2", "--workers", "1", "--offline", "--data-dir",
                str(self.data_dir)]

    def oracle(self, name: str, spec: dict, folder: Path) -> Answers:
        exp, run = LCLS2_RUNS[name]
        return oracle_answers(self.data_dir, self.calib_dir, exp, run, spec, folder)


def smdwriter_path() -> str:
    """psana's smdwriter, found as our writer finds it."""
    return run_psana(["-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                            f"from make_xtc2_run import smdwriter; print(smdwriter())"]).strip()


@pytest.fixture(scope="session")
def lcls2_runs(tmp_path_factory) -> Lcls2Runs:
    root = tmp_path_factory.mktemp("lcls2")
    runs = Lcls2Runs(root / "xtc", root / "calib")
    (runs.data_dir / "smalldata").mkdir(parents=True)
    runs.calib_dir.mkdir()
    tool = None
    for name, (exp, run) in LCLS2_RUNS.items():
        source = LCLS2_DATA / name
        if source.is_dir():
            for path in sorted(source.glob("*.xtc2")):
                name = f"{exp}-r{run:04d}-s{path.name.split('-s', 1)[1]}"
                (runs.data_dir / name).symlink_to(path)
                smd = name.replace(".xtc2", ".smd.xtc2")
                (runs.data_dir / "smalldata" / smd).symlink_to(
                    source / "smalldata" / path.name.replace(".xtc2", ".smd.xtc2"))
            continue
        tool = tool or smdwriter_path()
        linked = runs.data_dir / f"{exp}-r{run:04d}-s000-c000.xtc2"
        linked.symlink_to(LCLS2_DATA / f"{name}.xtc2")
        smd = runs.data_dir / "smalldata" / linked.name.replace(".xtc2", ".smd.xtc2")
        subprocess.run([tool, "-f", str(linked), "-o", str(smd)], check=True,
                       capture_output=True, timeout=300)
    return runs


def psana_channels(answers: Answers, key: str, channels: List[List[int]]):
    """psana's answer for a digitizer's channels ({segment: {channel: array}})
    stacked in the order the server lists them, or None where psana gave none."""
    parts = [answers.get(f"{key}/{segment}/{chan}") for segment, chan in channels]
    return None if any(p is None for p in parts) else np.stack(parts)


def assert_peaks(table: np.ndarray, answers: Answers, key: str) -> None:
    """A served peaks table (rows [segment, channel, start, length, samples...])
    holds exactly psana's peaks ({segment: {channel: (starts, peaks)}})."""
    served: Dict[str, list] = {}
    for row in np.asarray(table):
        segment, chan, start, length = (int(v) for v in row[:4])
        served.setdefault(f"{segment}/{chan}", []).append((start, row[4:4 + length]))
        assert not row[4 + length:].any()
    parts = answers.parts(key)
    channels = sorted(k[:-2] for k in parts if k.count("/") == 2 and k.endswith("/0"))
    assert sorted(served) == channels
    for channel in channels:
        starts = parts[f"{channel}/0"].tolist()
        assert [start for start, _ in served[channel]] == starts
        for k, (_, samples) in enumerate(served[channel]):
            peak = parts[f"{channel}/1/{k}"]
            assert np.can_cast(peak.dtype, np.int64) and np.array_equal(samples, peak)


# A run of our writer with every kind the issue names beside area detectors:
# a digitizer (raw waveforms in even events only), a 1-D camera read out every
# 3rd event from event 2 (the integrating detector of the run), a line camera,
# timing with event codes, a step scan of KINDS_STEPS steps and EPICS PVs
KINDS_RUN, KINDS_EVENTS, KINDS_STEPS = 12, 12, 3
KINDS_DETECTORS = ("hsd", "timing", "andor", "piranha4", "scan", "epics")
KINDS_CALLS = (("hsd", "raw", "waveforms"), ("hsd", "raw", "padded"), ("hsd", "raw", "peaks"),
               ("timing", "raw", "eventcodes"), ("timing", "raw", "pulseId"),
               ("timing", "raw", "timestamp"), ("timing", "raw", "destination"),
               ("timing", "raw", "inhibitCounts"), ("andor", "raw", "raw"),
               ("piranha4", "raw", "raw"), ("piranha4", "raw", "calib"))
SCAN_VARIABLES = ("motor1", "step_docstring", "step_value")


@dataclass(frozen=True)
class KindsRun:
    data_dir: Path
    answers: Answers

    def server_args(self) -> List[str]:
        return ["--source", "psana2", "--workers", "1", "--offline", "--data-dir",
                str(self.data_dir)]


@pytest.fixture(scope="session")
def kinds_run(tmp_path_factory) -> KindsRun:
    root = tmp_path_factory.mktemp("psana2-kinds")
    run_psana([str(ROOT / "scripts" / "make_xtc2_run.py"), "--outdir", str(root / "xtc"),
               "--exp", EXP, "--run", str(KINDS_RUN), "-n", str(KINDS_EVENTS),
               "--detectors", *KINDS_DETECTORS, "--steps", str(KINDS_STEPS),
               "--rate", "andor=3:2"])
    spec = {"events": None, "calls": [list(call) for call in KINDS_CALLS], "steps": True,
            "env": [["scan", var] for var in SCAN_VARIABLES] + [["epics", pv] for pv in PVS],
            "intg_det": "andor"}
    (root / "calib").mkdir()
    return KindsRun(root / "xtc", oracle_answers(root / "xtc", root / "calib", EXP, KINDS_RUN,
                                                  spec, root))
