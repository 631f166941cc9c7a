"""The launcher on a real one-node SLURM (the slurm_cluster fixture, started
for this module and stopped after it): `sbatch -W` returns the client's exit
code, a two-task job gives each rank its own shard through srun, and scancel
leaves no server or segment behind."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from psana2_helpers import psana_python
from psana_ipc.client.slurm import submit
from slurm.jobs import EXAMPLES, processes_mentioning, squeue_state, wait_until, write_job

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def slurm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psana_ipc.client.slurm", *args],
                          capture_output=True, text=True, timeout=300)


def job_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((tmp_path / "logs").rglob("*.*")))


@pytest.mark.parametrize("code", [0, 3])
def test_sbatch_wait_returns_the_clients_exit_code(tmp_path, code):
    job = write_job(tmp_path, ["bash", "-c", f"psana-ipc ping && exit {code}"])
    assert submit(str(job)) == code, job_log(tmp_path)
    assert "pong from unix:" in job_log(tmp_path)
    assert processes_mentioning(str(tmp_path)) == []


def test_cli_submit_runs_the_job_and_waits(tmp_path):
    done = slurm_cli("--log-dir", str(tmp_path / "logs"), "--client-env", sys.prefix,
                     "--server-env", str(Path(psana_python()).parents[1]),
                     "--server-args=--workers 1", "--submit", "--", "psana-ipc", "ping")
    assert done.returncode == 0, done.stderr + job_log(tmp_path)
    assert (tmp_path / "logs" / "psana-ipc.sh").exists()


def test_cli_submit_says_the_job_id_its_state_and_when_the_server_is_ready(tmp_path):
    done = slurm_cli("--log-dir", str(tmp_path / "logs"), "--client-env", sys.prefix,
                     "--server-env", str(Path(psana_python()).parents[1]),
                     "--server-args=--workers 1", "--submit", "--",
                     "bash", "-c", "psana-ipc ping && sleep 3")
    assert done.returncode == 0, done.stderr + job_log(tmp_path)
    job = re.search(r"submitted job (\d+)", done.stderr).group(1)
    assert f"job {job}: RUNNING" in done.stderr
    assert f"job {job}: server ready on " in done.stderr
    assert done.stderr.rstrip().endswith(f"job {job} ended with exit code 0")


def test_two_task_job_gives_each_rank_its_shard(tmp_path):
    job = write_job(tmp_path, ["python", str(EXAMPLES / "train.py"), "--exp", "exp", "--run", "1",
                               "--detector", "epix100", "--events", "10", "--epochs", "1",
                               "--summary", str(tmp_path / "rank{rank}.json")],
                    server_args=["--workers", "2"], ntasks=2)
    done = subprocess.run(["sbatch", "-W", str(job)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, job_log(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["events"] == [0, 2, 4, 6, 8] and ranks[1]["events"] == [1, 3, 5, 7, 9]
    assert [r["frames"] for r in ranks] == [5, 5]
    assert processes_mentioning(str(tmp_path)) == []


def test_scancel_stops_client_and_server(tmp_path):
    started = tmp_path / "started"
    job = write_job(tmp_path, ["bash", "-c", f"psana-ipc ping && touch {started} && sleep 600"])
    job_id = subprocess.run(["sbatch", "--parsable", str(job)], capture_output=True, text=True,
                            check=True).stdout.strip()
    wait_until(lambda: started.exists() or squeue_state(job_id) == "", "client start")
    assert started.exists(), job_log(tmp_path)
    subprocess.run(["scancel", job_id], check=True)
    wait_until(lambda: squeue_state(job_id) == "", "end of the cancelled job")
    assert processes_mentioning(str(tmp_path)) == []
    assert "stopped" in (next((tmp_path / "logs").glob("psana-ipc-*/server-*.log")).read_text())
