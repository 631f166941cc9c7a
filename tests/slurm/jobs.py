"""What the launcher tests share: job scripts whose server runs in the psana
environment and whose client runs in pytest's, a job's state, and a look for
what a job left running."""
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

from conftest import pid_alive
from psana2_helpers import psana_python
from psana_ipc.client.slurm import JobSpec, activation, render_script

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "scripts" / "slurm"


def write_job(tmp_path: Path, command: Sequence[str],
              server_args: Sequence[str] = ("--workers", "1"),
              **resources) -> Path:
    """A job script in tmp_path with logs in tmp_path/logs; iserver comes from the psana
    venv and psana-ipc from pytest's, each activated by the script itself."""
    spec = JobSpec(command=list(command), log_dir=str(tmp_path / "logs"),
                   server_env=activation(str(Path(psana_python()).parents[1])),
                   client_env=activation(sys.prefix), server_args=list(server_args),
                   **resources)
    (tmp_path / "logs").mkdir(exist_ok=True)
    path = tmp_path / "job.sh"
    path.write_text(render_script(spec))
    return path


def processes_mentioning(text: str) -> List[str]:
    """Command lines of live processes that contain `text` (e.g. a test's tmp path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not (entry.name.isdigit() and pid_alive(int(entry.name))):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def squeue_state(job_id: str) -> str:
    """The job's state as squeue tells it ("" once it has left the queue)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def wait_until(condition, what: str, timeout: float = 300.0) -> None:
    """Poll; a deadline only so that a broken job fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.1)
