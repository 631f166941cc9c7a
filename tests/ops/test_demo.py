"""The README's first command runs the demo: it must keep working."""
import os
import subprocess
import sys

from conftest import ROOT

SMALL = ["--events", "40", "--batch-size", "10", "--loader-workers", "0", "--repeats", "1",
         "--cost-ms", "1", "--frame-cache", "512M"]


def test_demo_reads_an_epoch_then_serves_it_from_the_cache_three_ways_and_stops_with_done():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), *SMALL],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    rates = {line.split("  ")[0]: line for line in lines if "frames/s" in line}
    assert sorted(rates) == ["BatchLoader", "IPCRemotePsanaDataset",
                             "btx dialect, DataLoader", "first epoch, read by the source:"]
    assert rates["btx dialect, DataLoader"].endswith("1.0x btx dialect")
    assert any(line.startswith("stopped the server at") and line.endswith("(1 DONE)")
               for line in lines)
    assert lines[-1] == "server stopped (exit 0)"
    assert "frames/s]" in result.stderr   # the progress bars show the rate as it goes


def test_demo_sh_installs_nothing_once_its_environment_is_there():
    """With .venv already built, any pip install would fail here (no index, no
    wheels): the demo must run without one."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *SMALL, "--quiet"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "server stopped (exit 0)"
