"""The README's first command runs the demo: it must keep working."""
import subprocess
import sys

from conftest import ROOT


def test_demo_loads_through_both_dialects_and_stops_its_server():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--events", "40",
                             "--batch-size", "10", "--loader-workers", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("v1") and "frames/s" in line for line in lines)
    assert any(line.strip().startswith("legacy") and "frames/s" in line for line in lines)
    assert lines[-1] == "server stopped (exit 0)"
