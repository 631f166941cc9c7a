"""A torch.distributed (gloo) job of 4 ranks, each with DataLoader workers,
SIGKILLed mid-epoch after checkpointing and resumed on 3 and on 2 ranks, sees
every event of the epoch once, in the global order of an uninterrupted run
(DistributedSampler's): through ResumableDataLoader and through torchdata's
StatefulDataLoader."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import ServerProcess
from resume_rank import EPOCH, SEED

HERE = Path(__file__).parent
EVENTS = 30
SAVE_AFTER, HOLD_AFTER = 2, 3       # steps of the 4-rank run: saved after 2, killed after 3


def start_ranks(server, tmp: Path, name: str, world: int, loader: str, workers: int,
                **steps: int) -> List[subprocess.Popen]:
    """`world` rank processes, each in a session of its own (its DataLoader workers with it)."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    args = [sys.executable, str(HERE / "resume_rank.py"), "--address", server.address,
            "--rendezvous", str(tmp / f"{name}.rendezvous"), "--checkpoint",
            str(tmp / f"{loader}.checkpoint.json"), "--loader", loader,
            "--world", str(world), "--workers", str(workers)]
    for option, value in steps.items():
        args += [f"--{option.replace('_', '-')}", str(value)]
    return [subprocess.Popen(args + ["--rank", str(r), "--log", str(tmp / f"{name}.{r}.log")],
                             env=env, start_new_session=True) for r in range(world)]


def finish(ranks: List[subprocess.Popen]) -> None:
    for proc in ranks:
        assert proc.wait(timeout=300) == 0


def global_sequence(tmp: Path, name: str, world: int, before_step: int = -1) -> List[int]:
    """The events a run's ranks logged, in global order: step by step, rank r's
    j-th event of a step at place j * world + r (`before_step`: only earlier steps)."""
    steps: Dict[int, Dict[int, List[int]]] = {}
    for r in range(world):
        for line in (tmp / f"{name}.{r}.log").read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], {})[r] = entry["events"]
    seen = []
    for step in sorted(s for s in steps if before_step < 0 or s < before_step):
        rows = [steps[step].get(r, []) for r in range(world)]
        for j in range(max(len(row) for row in rows)):
            seen += [row[j] for row in rows if j < len(row)]
    return seen


def wait_held(tmp: Path, name: str, ranks: List[subprocess.Popen]) -> None:
    """Until every rank marked that it is past the checkpoint (or one died)."""
    while not all((tmp / f"{name}.{r}.log.held").exists() for r in range(len(ranks))):
        for proc in ranks:
            assert proc.poll() is None, f"rank exited {proc.returncode} before the kill"
        time.sleep(0.1)


def kill(ranks: List[subprocess.Popen]) -> None:
    for proc in ranks:
        os.killpg(proc.pid, signal.SIGKILL)
    for proc in ranks:
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ServerProcess(["--workers", "2", "--synthetic-events", str(EVENTS)],
                           tmp_path_factory.mktemp("server"))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def uninterrupted() -> List[int]:
    """The epoch's events in the global order of a run never stopped, as
    DistributedSampler defines it: torch.randperm seeded with seed + epoch,
    rank r taking every world-th from r, so that step by step the ranks'
    batches, read across, give the permutation itself."""
    generator = torch.Generator().manual_seed(SEED + EPOCH)
    return torch.randperm(EVENTS, generator=generator).tolist()


@pytest.mark.parametrize("loader, workers", [("resumable", (2, 1, 2)),
                                             ("stateful", (1, 1, 1))])
def test_killed_job_resumed_on_three_and_on_two_ranks_sees_each_event_once_in_order(
        server, uninterrupted, tmp_path, loader, workers):
    ranks = start_ranks(server, tmp_path, "killed", 4, loader, workers[0],
                        save_after=SAVE_AFTER, hold_after=HOLD_AFTER)
    wait_held(tmp_path, "killed", ranks)
    kill(ranks)
    done = global_sequence(tmp_path, "killed", 4, before_step=SAVE_AFTER)
    lost = global_sequence(tmp_path, "killed", 4)[len(done):]
    assert len(done) == 4 * 2 * SAVE_AFTER and lost, "the kill came after more steps"
    checkpoint = json.loads((tmp_path / f"{loader}.checkpoint.json").read_text())
    for world, count in ((3, workers[1]), (2, workers[2])):
        name = f"resumed-on-{world}"
        finish(start_ranks(server, tmp_path, name, world, loader, count))
        rest = global_sequence(tmp_path, name, world)
        assert done + rest == uninterrupted, f"resumed on {world} ranks"
    assert json.loads((tmp_path / f"{loader}.checkpoint.json").read_text()) == checkpoint
