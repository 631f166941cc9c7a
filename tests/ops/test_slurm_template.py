"""The SLURM job script is a packaged bash template (client/slurm_job.sh):
shellcheck passes it and the scripts rendered from it, rendering fills every
placeholder, and the template ships in the wheel."""
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from psana_ipc.client import slurm

SHELLCHECK = shutil.which("shellcheck")
needs_shellcheck = pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck is not installed (scripts/setup_envs.sh installs it "
                               "when run as root; else `sudo apt-get install shellcheck`)")

TYPICAL = slurm.JobSpec(
    command=["python", "train.py", "--epochs", "3", "--out", "runs/r{rank}.json"],
    job_name="train", log_dir="/tmp/psana-ipc-logs", partition="milano", account="lcls",
    nodes=2, ntasks=8, cpus_per_task=4, gpus="a100:4", time="02:00:00",
    server_env="source /sdf/group/lcls/ds/ana/sw/conda1/manage/bin/psconda.sh",
    client_env="source /home/me/venv/bin/activate",
    server_args=["--source", "psana2", "--workers", "4", "--budget", "8G"])


def shellcheck(path: Path) -> None:
    result = subprocess.run([SHELLCHECK, "--shell=bash", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_shellcheck
def test_shellcheck_passes_the_template():
    template = Path(str(slurm.resources.files("psana_ipc.client").joinpath(slurm.TEMPLATE)))
    assert slurm.PLACEHOLDER.search(template.read_text())   # the template itself, unrendered
    shellcheck(template)


@needs_shellcheck
def test_shellcheck_passes_a_rendered_job(tmp_path):
    path = tmp_path / "job.sh"
    path.write_text(slurm.render_script(TYPICAL))
    shellcheck(path)


def test_rendering_fills_every_placeholder():
    script = slurm.render_script(TYPICAL)
    assert not slurm.PLACEHOLDER.search(script)
    assert script.startswith("#!/bin/bash\n#SBATCH --partition=milano\n#SBATCH --job-name=train\n")
    assert "SERVER_ARGS=(--source psana2 --workers 4 --budget 8G)\n" in script


def test_the_template_ships_in_the_wheel(project_wheel):
    wheel, _ = project_wheel
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read(f"psana_ipc/client/{slurm.TEMPLATE}").decode()
    assert shipped == slurm.job_template()

