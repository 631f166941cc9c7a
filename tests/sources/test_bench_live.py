"""`scripts/bench_live.py` runs every one of its runs small: the writer grows
real XTC2 runs, psana2 serves them live, every follow hands out each event
once in order (the 10 Hz run's frames checked against psana's own read of
the finished run) and `latest` counts what it skipped (figures are never
judged)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from psana2_helpers import psana_python

pytestmark = pytest.mark.psana2


def test_the_live_benchmark_runs_small_and_checks_its_frames(tmp_path):
    out = tmp_path / "live.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_live.py"),
                           "--psana-python", psana_python(), "--workdir", str(tmp_path / "runs"),
                           "--events", "12", "--fast-events", "12", "--small-events", "200",
                           "--small-rate", "40", "--small-seconds", "1.5", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    follows = [rows[f"follow 10 Hz epix10k2M {mode}"] for mode in ("raw", "calib")]
    assert all(row["identical_to_psana"] and row["events"] == 12 for row in follows)
    assert rows["fastest cspad raw"]["events"] == 200
    every, latest = rows["half-rate consumer, every (40 Hz)"], \
        rows["half-rate consumer, latest (40 Hz)"]
    assert every["events"] == 60 and every["skipped"] == 0
    assert latest["events"] + latest["skipped"] == 60
    named = [name for name in rows if name != "load_average"]
    assert all(rows[name]["in_order_once"] and "EndRun" in rows[name]["ended"]
               for name in named)
    assert "identical to psana's read of the finished run: True" in done.stdout
