"""The SLURM training example with --checkpoint saves the model, optimizer and loader position after each epoch, and a second run goes on from the saved epoch instead of starting over."""
import json
import subprocess
import sys

from slurm.jobs import EXAMPLES

from psana_ipc.client.position import where


def train(server, tmp_path, epochs):
    summary = tmp_path / f"summary-{epochs}.json"
    subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--address", server.address,
                    "--exp", "exp", "--run", "1", "--detector", "epix100", "--events", "6",
                    "--epochs", str(epochs), "--loader-workers", "1", "--checkpoint",
                    str(tmp_path / "train.pt"), "--summary", str(summary)],
                   check=True, timeout=120)
    return json.loads(summary.read_text())


def test_a_second_run_goes_on_from_the_saved_epoch(server, tmp_path):
    assert train(server, tmp_path, 1)["frames"] == 6
    assert where(tmp_path / "train.pt").epoch == 1
    assert train(server, tmp_path, 3)["frames"] == 12      # epochs 1 and 2 only
    position = where(tmp_path / "train.pt")
    assert (position.epoch, position.events_done, position.events) == (3, 0, 6)
