"""Stopping a training job so that it resumes: the warning a SLURM job gets
before its time limit, and the exit status that asks for a requeue.

A job written by `psana-ipc slurm --warn-before S` receives WARNING_SIGNAL
(SIGUSR2) S seconds before its limit and passes it on to every task of the
client; with `--requeue`, a client that exits RESUME_EXIT (75, "try again")
is requeued once the servers are stopped. A training loop hooks it so:

    stop = preemption.watch()
    for batch in loader:
        train_step(batch)
        if stop.agreed():                    # every rank at the same step
            save({"model": ..., "loader": loader.state_dict()})
            sys.exit(preemption.RESUME_EXIT)

The handler only sets a flag (a signal can arrive inside any step), and
`agreed()` has every rank of an initialized torch.distributed group stop
after the same step, as a lockstep checkpoint needs.
"""
import signal
import sys
from typing import Iterable

RESUME_EXIT = 75
WARNING_SIGNAL = signal.SIGUSR2


class Preemption:
    """Whether a stop was asked for by one of `signals` since `watch()`."""

    def __init__(self, signals: Iterable[int]) -> None:
        self._asked = False
        for sig in signals:
            signal.signal(sig, self._ask)

    def _ask(self, signum: int, frame: object) -> None:
        self._asked = True

    def requested(self) -> bool:
        """This process got the signal."""
        return self._asked

    def agreed(self) -> bool:
        """Some rank got the signal; the same answer on every rank of an
        initialized torch.distributed group (a collective: call it on every
        rank at the same step), else this process's own."""
        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return self._asked
        import torch
        asked = torch.tensor([int(self._asked)])
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        return bool(asked.item())


def watch(signals: Iterable[int] = (WARNING_SIGNAL,)) -> Preemption:
    """Start noting the job's warning signal (from the main thread)."""
    return Preemption(signals)
