"""What the live-run tests share: our writer growing a run as the DAQ does
(scripts/make_xtc2_run.py --live, in the psana environment, in a process of
its own that a test pauses, resumes or kills as a DAQ stops), psana's own
live read of it, and servers reading the growing runs."""
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest

from psana2_helpers import EXP, ROOT, psana_python

WRITER = ROOT / "scripts" / "make_xtc2_run.py"
WAIT = 120.0        # seconds a test waits for the writer before failing


class LiveWriter:
    """One run written live into `outdir`; `times` logs each event once written."""

    def __init__(self, outdir: Path, run: int, events: int, rate: float, *options: str,
                 stop_after: Sequence[int] = ()) -> None:
        """For each N of `stop_after` the writer stops itself once N events
        are written (N = events: before its EndRun), as a paused DAQ, until
        `resume`."""
        outdir.mkdir(parents=True, exist_ok=True)
        self.outdir, self.run, self.events = outdir, run, events
        self.times = outdir / f"times-r{run:04d}.txt"
        self.proc = subprocess.Popen(
            [psana_python(), str(WRITER), "--outdir", str(outdir), "--exp", EXP, "--run",
             str(run), "-n", str(events), "--live", str(rate), "--times", str(self.times),
             *(["--stop-after", *map(str, stop_after)] if stop_after else []), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def written(self) -> List[int]:
        """The events the writer has logged as written in every stream."""
        if not self.times.exists():
            return []
        return [int(line.split()[0]) for line in self.times.read_text().splitlines()
                if len(line.split()) == 2]

    def stopped(self, count: int) -> List[int]:
        """Once the writer has stopped itself after `count` events: the events written."""
        deadline = time.monotonic() + WAIT
        while len(self.written()) < count or process_state(self.proc.pid) != "T":
            assert self.proc.poll() is None, f"the writer ended:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "the writer did not stop"
            time.sleep(0.05)
        return self.written()

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> List[int]:
        """The writer dies as a crashed DAQ would (no EndRun, nothing renamed);
        the MPI segment its psana left is removed. The events written."""
        self.proc.kill()
        self.proc.communicate(timeout=WAIT)
        for name in Path("/dev/shm").glob(f"mpich_shm_{self.proc.pid:x}_*"):
            name.unlink()
        return self.written()

    def finish(self) -> str:
        """The writer's report, once it has written the whole run."""
        output, _ = self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == 0, output
        return output

    def files(self) -> List[Path]:
        return sorted(self.outdir.glob(f"{EXP}-r{self.run:04d}-*")) + sorted(
            (self.outdir / "smalldata").glob(f"{EXP}-r{self.run:04d}-*"))


def process_state(pid: int) -> str:
    """The state letter /proc gives a process (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class LiveOracle:
    """psana's own read of a run in live mode (tests/psana2_live_oracle.py),
    started while the run grows; `answers()` once the run has ended."""

    def __init__(self, data_dir: Path, calib_dir: Path, run: int, calls: List[str],
                 out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [psana_python(), str(ROOT / "tests" / "psana2_live_oracle.py"), str(data_dir),
             str(calib_dir), EXP, str(run), ",".join(calls), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_read(self, count: int) -> None:
        """Until psana has read `count` events."""
        progress = Path(str(self.out) + ".read")
        deadline = time.monotonic() + WAIT
        while not progress.exists() or len(progress.read_text().split()) < count:
            assert self.proc.poll() is None, f"psana stopped:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "psana did not read the events"
            time.sleep(0.05)

    def answers(self) -> Dict[str, np.ndarray]:
        output, _ = self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == 0, output
        with np.load(self.out) as found:
            return dict(found)


def server_args(data_dir: Path, workers: int = 1, calib_dir: Path = None) -> List[str]:
    args = ["--source", "psana2", "--workers", str(workers), "--offline", "--data-dir",
            str(data_dir)]
    return args + (["--calib-dir", str(calib_dir)] if calib_dir else [])


@pytest.fixture
def live_writer():
    """Start writers with `live_writer(outdir, run, events, rate, *options,
    stop_after=...)`; one still running when the test ends (a failure while
    it is stopped, say) is killed."""
    started: List[LiveWriter] = []

    def start(*args, **kwargs) -> LiveWriter:
        started.append(LiveWriter(*args, **kwargs))
        return started[-1]

    yield start
    for writer in started:
        if writer.proc.poll() is None:
            writer.kill()
