"""`scripts/bench.py --across-nodes` runs on its own hosts, prints every row
beside its plain stream and writes them as JSON, with every frame checked
and the killed server left out (figures are never judged)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_the_across_nodes_benchmark_runs_and_checks_its_frames(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the benchmark makes network namespaces and must run as root")
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--across-nodes",
                           "--detectors", "epix100", "--frames", "20", "--batch-size", "5",
                           "--repeats", "1", "--cost-ms", "5", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = {row["path"]: row for row in json.loads(out.read_text())["rows"]}
    assert "| veth | BatchLoader inline, 1 server |" in done.stdout
    two = rows["one loader, 2 servers"]
    killed = rows["the same, one server killed in the first epoch; later epochs"]
    assert two["identical"] == two["checked"] == 20 and two["lost"] == []
    assert killed["identical"] == killed["checked"] == 20 and len(killed["lost"]) == 1
    assert all(row["fps"] > 0 for row in rows.values())
