"""`scripts/time_psana2_source.py` times the psana2 source on a real run: it
opens the run and reads every mode of a detector, printing a row for each
with the frame's shape (figures are never judged)."""
import subprocess

import pytest

from conftest import ROOT
from psana2_helpers import EXP, RUN, psana_python

pytestmark = pytest.mark.psana2


def test_it_reads_every_mode_of_a_detector_and_prints_a_row_each(psana2_runs):
    done = subprocess.run([psana_python(), str(ROOT / "scripts" / "time_psana2_source.py"),
                           "--data-dir", str(psana2_runs.data_dir), "--calib-dir",
                           str(psana2_runs.calib_dir), "--exp", EXP, "--run", str(RUN),
                           "--detectors", "epix10k2M", "--reads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {tuple(line.split()[:2]): line.split()[2] for line in done.stdout.splitlines()
            if line.startswith("epix10k2M") and len(line.split()) > 3}
    assert {mode for _, mode in rows} == {"raw", "calib", "image"}
    assert rows["epix10k2M", "raw"] == rows["epix10k2M", "calib"] == "16x352x384"
    assert "epix10k2M   open" in done.stdout
