"""`IPCRemotePsanaDataset`: the btx dataset, same signature and items, over
v1 when the server speaks it and the legacy dialect otherwise.

Each process (each DataLoader worker) keeps its own connections, one per
server worker (a ConnectionGroup; they reconnect after fork). DataLoader
hands `__getitems__` a whole batch of indices; runs of consecutive requests
for the same run and detector become one request split over all server
workers, and each frame is copied once, straight from its slot, into a
reused batch buffer (batch_ring); the items are rows of that buffer, which
the default collate hands on as the batch itself (batch_collate), through
workers as a handle (batch_handoff). `dataset[i]` always returns a private copy.

Lifetime rule: a batch is never overwritten while anything refers to it (the
tensor, a view or slice, an array made from it); without workers it also
stays unchanged until `buffers` more batches have been drawn once dropped.
Code that keeps every batch stays correct (the ring grows), so `.clone()` is
never needed for correctness; `buffers=0` gives every batch fresh memory.

With `protocol="auto"` the dialect is probed once, when the dataset is made
(before DataLoader forks its workers, which inherit the answer): see
`legacy.probe`. Only if the server cannot be reached then does each process
probe on its first fetch. A "legacy" answer that a marked reply later
contradicts (or an `unauthorized` from our server, which refuses the legacy
dialect with a token) switches that process to v1.
"""
from itertools import groupby
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from psana_ipc.protocol.errors import UNAUTHORIZED, ServerError
from psana_ipc.protocol.legacy import is_ours

from . import batch_handoff, legacy
from .batch_collate import RingBatch
from .batch_ring import BatchRing
from .connection import Client
from .group import ConnectionGroup

Request = Tuple[Any, ...]   # (exp, run, access_mode, detector_name, event)
# Frames each connection may hold: the client copies and releases each frame at
# once, so a few suffice, and DataLoader workers that live one epoch then cost
# the server a few fresh slots per connection rather than one per frame in flight.
WINDOW = 8


class IPCRemotePsanaDataset(Dataset):
    def __init__(self, server_address: Any, requests_list: Sequence[Request],
                 mode: str = "calib", protocol: str = "auto", transport: str = "auto",
                 timeout: Optional[float] = 300.0, buffers: int = 2) -> None:
        """
        server_address: (host, port), "host:port", a UNIX socket path, or None
            for $PSANA_IPC_ADDRESS.
        requests_list: tuples (exp, run, access_mode, detector_name, event).
        mode: raw, calib, image or mask. protocol: "auto", "v1" or "legacy".
        buffers: batches drawn before a dropped batch's memory is reused (the
            lifetime rule in the module docstring); 0: fresh memory every batch.
        """
        if protocol not in ("auto", "v1", "legacy"):
            raise ValueError("protocol must be 'auto', 'v1' or 'legacy'")
        self.server_address = server_address
        self.requests_list = requests_list
        self.mode = mode
        self.protocol = protocol
        self.timeout = timeout
        self._auto = protocol == "auto"
        self._group = ConnectionGroup(server_address, transport=transport, window=WINDOW,
                                      timeout=timeout)
        self._ring = BatchRing(buffers, batch_handoff.claim)
        if self._auto and len(requests_list):
            try:
                self._dialect()
            except OSError:
                pass   # not reachable yet: each process probes on its first fetch

    def __len__(self) -> int:
        return len(self.requests_list)

    def _dialect(self) -> str:
        if self.protocol == "auto":
            wait = legacy.PROBE_TIMEOUT if self.timeout is None \
                else min(self.timeout, legacy.PROBE_TIMEOUT)
            self.protocol = legacy.probe(self._group.address, self.requests_list[0], self.mode,
                                         wait)
        return self.protocol

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.fetch_event(*self.requests_list[idx])

    def fetch_event(self, exp: str, run: Any, access_mode: str, detector_name: str,
                    event: int) -> np.ndarray:
        if self._dialect() == "legacy":
            try:
                frame, reply = legacy.fetch_reply(self._group.address, exp, run, access_mode,
                                                  detector_name, event, self.mode, self.timeout)
            except ServerError as e:
                if not (self._auto and e.code == UNAUTHORIZED and is_ours(e.reply)):
                    raise
                self.protocol = "v1"
            else:
                if self._auto and is_ours(reply):
                    self.protocol = "v1"
                return frame
        return self._group.clients[0].get(exp, run, detector_name, event, self.mode,
                                          access_mode)

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        """A DataLoader batch: rows of one ring batch (see the module docstring)."""
        requests = [self.requests_list[i] for i in indices]
        if self._dialect() == "legacy":
            return [self.fetch_event(*r) for r in requests]
        return self._assemble(requests)

    def _assemble(self, requests: List[Request]) -> List[np.ndarray]:
        """Copy every frame once from its slot into a ring batch, releasing the
        slot at once. Frames unlike the first in shape or dtype cannot share a
        tensor: such a batch gets private arrays, which collate rejects as
        torch does for any dataset."""
        batch: Optional[RingBatch] = None
        odd = {}
        base = 0
        for (exp, run, access, det), group in groupby(requests, key=lambda r: tuple(r[:4])):
            events = [r[4] for r in group]
            split = self._group.submit(exp, run, det, events, self.mode, access)
            for pos, frame in self._group.stream(split):
                with frame:
                    if batch is None:
                        batch = RingBatch(self._ring, (len(requests),) + frame.array.shape,
                                          frame.array.dtype)
                    if batch.fits(frame.array):
                        np.copyto(batch.array[base + pos], frame.array, casting="no")
                    else:
                        odd[base + pos] = np.array(frame.array)
            base += len(events)
        self._group.flush_releases()
        if odd:
            return [odd.get(k, np.array(batch.array[k])) for k in range(len(requests))]
        return batch.rows()

    def close(self) -> None:
        """Drop this process's connections (they reconnect on the next fetch)."""
        self._group.close()


class RunDataset(IPCRemotePsanaDataset):
    """One detector of one run as a map-style dataset: item i is event `events[i]`
    (all of the run's events by default)."""

    def __init__(self, server_address: Any, exp: str, run: int, detector: str,
                 mode: str = "calib", events: Optional[Sequence[int]] = None,
                 transport: str = "auto", timeout: Optional[float] = 300.0,
                 buffers: int = 2) -> None:
        if events is None:
            with Client(server_address, transport=transport, timeout=timeout) as client:
                events = range(client.info(exp, run, detector)["events"])
        super().__init__(server_address, [(exp, run, "idx", detector, int(e)) for e in events],
                         mode=mode, protocol="v1", transport=transport, timeout=timeout,
                         buffers=buffers)
        self.exp, self.run, self.detector = exp, run, detector
