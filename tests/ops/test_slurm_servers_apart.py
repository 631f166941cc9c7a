"""`psana-ipc slurm --server-nodes N`: a heterogeneous job whose second
component (CPU nodes) runs the servers; its script, run with plain bash as
the batch node would, starts them on the node's address with a token of its
own and hands the client every address and the token, leaving nothing."""
import argparse
import json
import subprocess
import sys

from psana_ipc.client import slurm

from slurm.jobs import processes_mentioning, write_job

CLIENT = """
import json, os, sys
from psana_ipc.client import BatchLoader, Client
with Client(os.environ["PSANA_IPC_ADDRESS"].split(",")[0]) as c:
    c.ping()
frames = sum(len(b) for b in BatchLoader(None, "exp", 1, "epix100", events=range(12),
                                         batch_size=4))
token = open(os.environ["PSANA_IPC_TOKEN_FILE"]).read().strip()
json.dump({"address": os.environ["PSANA_IPC_ADDRESS"], "frames": frames,
           "token_mode": oct(os.stat(os.environ["PSANA_IPC_TOKEN_FILE"]).st_mode & 0o777),
           "token_len": len(token)}, open(sys.argv[1], "w"))
"""


def test_the_header_asks_for_a_second_component_of_server_nodes(tmp_path):
    parser = argparse.ArgumentParser()
    slurm.add_arguments(parser)
    args = parser.parse_args(["--facility", "S3DF", "-p", "ampere", "--gpus", "1", "-c", "8",
                              "--server-nodes", "3", "--log-dir", str(tmp_path), "--",
                              "python", "train.py"])
    header = [line[len("#SBATCH "):] for line in slurm.render_script(
        slurm.spec_from_args(args)).splitlines() if line.startswith("#SBATCH ")]
    split = header.index("hetjob")
    client, servers = header[:split], header[split + 1:]
    assert {"--partition=ampere", "--gpus=1", "--cpus-per-task=8", "--account=lcls",
            "--exclusive"} <= set(client)
    assert servers == ["--partition=milano", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1",
                       "--time=01:00:00", "--mem=0", "--exclusive", "--account=lcls"]


def test_the_job_serves_over_tcp_with_a_token_it_made(tmp_path):
    summary = tmp_path / "summary.json"
    job = write_job(tmp_path, [sys.executable, "-c", CLIENT, str(summary)], server_nodes=1)
    done = subprocess.run(["bash", str(job)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(summary.read_text())
    assert not seen["address"].startswith("unix:") and seen["frames"] == 12
    assert seen["token_mode"] == "0o600" and seen["token_len"] == 64
    assert processes_mentioning(str(tmp_path)) == []
    run_dir = next((tmp_path / "logs").glob("psana-ipc-*"))
    assert not list(run_dir.glob("ready-*")) and not (run_dir / "token").exists()
    assert "stopped" in next(run_dir.glob("server-*.log")).read_text()
