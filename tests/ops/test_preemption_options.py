"""`psana-ipc slurm --requeue --warn-before S` writes the #SBATCH lines that ask for them, a job script shellcheck passes, and refuses a warning SLURM cannot send, in one line."""
import shutil
import subprocess
import sys

import pytest

from psana_ipc.client import slurm


def slurm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psana_ipc.client.slurm", *args],
                          capture_output=True, text=True, timeout=60)


def test_requeue_and_warning_are_in_the_header(tmp_path):
    done = slurm_cli("--log-dir", str(tmp_path), "--requeue", "--warn-before", "300", "--",
                     "python", "train.py")
    assert done.returncode == 0, done.stderr
    header = [line for line in done.stdout.splitlines() if line.startswith("#SBATCH")]
    assert header[-2:] == ["#SBATCH --requeue", "#SBATCH --signal=B:USR2@300"]
    for setting in ("\nREQUEUE=1 ", "\nRESUME_EXIT=75\n", "\nWARNING_SIGNAL=USR2 "):
        assert setting in done.stdout
    plain = slurm_cli("--log-dir", str(tmp_path), "--", "python", "train.py").stdout
    assert not [line for line in plain.splitlines()
                if line.startswith(("#SBATCH --requeue", "#SBATCH --signal"))]
    assert "REQUEUE=0" in plain


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_passes_a_preemptible_job(tmp_path):
    path = tmp_path / "job.sh"
    path.write_text(slurm.render_script(slurm.JobSpec(command=["python", "train.py"],
                                                      requeue=True, warn_before=120, ntasks=4)))
    done = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("seconds", ["0", "70000"])
def test_a_warning_slurm_cannot_send_is_refused(tmp_path, seconds):
    done = slurm_cli("--log-dir", str(tmp_path), "--warn-before", seconds, "--", "true")
    assert done.returncode == 2
    assert done.stderr.strip() == ("psana-ipc slurm: --warn-before takes seconds from 1 to "
                                   "65535 (SLURM's limit)")
