"""The job script run with plain bash, as a batch node would run it: iserver in
the psana venv, the client in pytest's venv. Whatever the client does, and
when the job itself is stopped, no server process and no segment remain."""
import json
import signal
import subprocess
import time

from slurm.jobs import EXAMPLES, processes_mentioning, write_job

PING_THEN_EXIT = "psana-ipc ping && exit {}"
# Holds a zero-copy frame (a server slot) until the job is stopped.
HOLD_A_FRAME = """
import sys, time
from psana_ipc.client import Client
frame = Client().view("exp", 1, "epix100", 3, "calib")
open(sys.argv[1], "w").close()
time.sleep(600)
"""


def run_job(tmp_path, command, **kw) -> subprocess.CompletedProcess:
    job = write_job(tmp_path, command, **kw)
    return subprocess.run(["bash", str(job)], capture_output=True, text=True, timeout=120)


def assert_nothing_left(tmp_path) -> None:
    assert processes_mentioning(str(tmp_path)) == []
    logs = list((tmp_path / "logs").glob("psana-ipc-*/server-*.log"))
    assert len(logs) == 1 and "stopped" in logs[0].read_text(), [p.read_text() for p in logs]


def test_job_passes_when_the_client_passes(tmp_path):
    summary = tmp_path / "summary.json"
    done = run_job(tmp_path, ["python", str(EXAMPLES / "pca.py"), "--exp", "exp", "--run",
                              "1", "--detector", "epix100", "--events", "6", "--components", "2",
                              "--summary", str(summary)])
    assert done.returncode == 0, done.stderr
    assert json.loads(summary.read_text())["frames"] == 6
    assert_nothing_left(tmp_path)


def test_job_exit_code_is_the_failing_clients(tmp_path):
    done = run_job(tmp_path, ["bash", "-c", PING_THEN_EXIT.format(3)])
    assert done.returncode == 3, done.stderr
    assert "pong from unix:" in done.stdout
    assert_nothing_left(tmp_path)


def test_sigterm_mid_run_stops_client_and_server(tmp_path):
    started = tmp_path / "started"
    job = write_job(tmp_path, ["python", "-c", HOLD_A_FRAME, str(started)],
                    server_args=["--workers", "2"])
    proc = subprocess.Popen(["bash", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert_nothing_left(tmp_path)


def test_server_that_cannot_start_fails_the_job_before_the_client(tmp_path):
    marker = tmp_path / "client-ran"
    done = run_job(tmp_path, ["touch", str(marker)], server_args=["--workers", "0"])
    assert done.returncode != 0
    assert "iserver exited before it was ready" in done.stderr
    assert "--workers must be at least 1" in done.stderr
    assert not marker.exists()
    assert processes_mentioning(str(tmp_path)) == []
