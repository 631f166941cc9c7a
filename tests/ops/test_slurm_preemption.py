"""On a real one-node SLURM, a job written with --requeue --warn-before passes the time-limit warning to its client, which checkpoints and exits 75; the job requeues itself and the resumed client sees the rest of the epoch, every event once, and nothing is left running."""
import json
import subprocess
from pathlib import Path

import pytest
from slurm.jobs import processes_mentioning, squeue_state, wait_until, write_job

from psana_ipc.client.epoch_order import global_order

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
CLIENT = Path(__file__).parent / "preempted_job.py"
EVENTS = 12


def test_warned_job_checkpoints_requeues_and_resumes_the_epoch(tmp_path):
    log, ready = tmp_path / "events.jsonl", tmp_path / "ready"
    job = write_job(tmp_path, ["python", str(CLIENT), "--checkpoint", str(tmp_path / "ck.json"),
                               "--log", str(log), "--ready", str(ready), "--events",
                               str(EVENTS), "--stop-after", "2"],
                    requeue=True, warn_before=60)
    assert "#SBATCH --requeue\n#SBATCH --signal=B:USR2@60\n" in job.read_text()
    job_id = subprocess.run(["sbatch", "--parsable", str(job)], capture_output=True, text=True,
                            check=True).stdout.strip()
    wait_until(lambda: ready.exists() or squeue_state(job_id) == "", "client at its second batch")
    assert ready.exists(), (tmp_path / "logs").iterdir()
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    wait_until(lambda: squeue_state(job_id) == "" and len(log.read_text().splitlines()) >= 6,
               "end of the requeued job")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["restart"] for e in entries] == [0, 0, 1, 1, 1, 1]
    assert sum((e["events"] for e in entries), []) == \
        [int(e) for e in global_order(EVENTS, 0, 9, True)]
    assert processes_mentioning(str(tmp_path)) == []
