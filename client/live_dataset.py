"""`LiveRunDataset`: a run followed while the DAQ writes it, as a torch
IterableDataset.

    loader = DataLoader(LiveRunDataset(addr, "tstx00117", 30, "epix10k2M"),
                        batch_size=8, num_workers=2)
    for frames in loader:          # as the run is written; ends with the run
        ...

Each DataLoader worker (and each rank of a distributed job) follows the run
on its own connection and takes its share of the detector's events: with n
followers in all, the k-th takes every n-th event from the k-th (by place
among the events holding the detector), so together they hand out every
event once (policy "every") and none twice. A DataLoader hands on each
worker's batches in turn, so batches come in the order of the workers'
shares rather than strictly by event. Items are frames, `(frame, {name:
value})` with `fields` (as RunDataset's), and with `metadata` a dict {run,
event, lag, skipped} last (see client/follow.py).
"""
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from .client import Client, Codes
from .dataset import plain
from .distributed import rank_and_world
from .follow import EVERY, POLL, TIMEOUT, LiveEvent


class LiveRunDataset(IterableDataset):
    """One detector of a run as it is written, in order (see the module docstring).

    Args:
        server_address: as for RunDataset.
        exp, run, detector, mode: the run, detector and mode.
        start: the first event to hand out.
        policy: "every" (every event, falling behind if slower than the run)
            or "latest" (the newest event at each look, the others skipped).
        timeout: seconds the run may stop growing without an EndRun, or take
            to begin, before the iteration ends.
        next_runs: go on to the experiment's next run when this one ends.
        fields, skip_incomplete, event_codes: as for RunDataset.
        metadata: items end with {run, event, lag, skipped}.
        rank, world_size: this process's share in a distributed job (default:
            as BatchLoader finds them).
    """

    def __init__(self, server_address: Any, exp: str, run: int, detector: str,
                 mode: str = "calib", *, start: int = 0, policy: str = EVERY,
                 timeout: float = TIMEOUT, next_runs: bool = False,
                 fields: Optional[Sequence[str]] = None, skip_incomplete: bool = False,
                 event_codes: Codes = None, metadata: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 transport: str = "auto", poll: float = POLL) -> None:
        super().__init__()
        self.server_address, self.transport = server_address, transport
        self.exp, self.run, self.detector, self.mode = exp, int(run), detector, mode
        self.fields = list(fields or [])
        self.metadata = metadata
        self.options: Dict[str, Any] = dict(start=start, policy=policy, timeout=timeout,
                                            next_runs=next_runs, fields=self.fields,
                                            skip_incomplete=skip_incomplete,
                                            event_codes=event_codes, poll=poll)
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.rank, self.world_size = rank, world_size
        self.reason = ""      # why the follow ended (in the process that iterated)

    def share(self) -> Tuple[int, int]:
        """This follower's share (k, n): ranks, then DataLoader workers in each."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def __iter__(self) -> Iterator[Any]:
        with Client(self.server_address, transport=self.transport) as client:
            follower = client.follow(self.exp, self.run, self.detector, self.mode,
                                     share=self.share(), **self.options)
            for event in follower:
                yield self.item(event)
            self.reason = follower.reason

    def item(self, event: LiveEvent) -> Any:
        parts = [event.frame]
        if self.fields:
            parts.append({name: plain(value) for name, value in event.values.items()})
        if self.metadata:
            parts.append({"run": event.run, "event": event.event, "lag": event.lag,
                          "skipped": event.skipped})
        return parts[0] if len(parts) == 1 else tuple(parts)
