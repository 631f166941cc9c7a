"""`IPCRemotePsanaDataset`: the btx dataset, same signature and items, over
v1 when the server speaks it and the legacy dialect otherwise.

Each process (each DataLoader worker) keeps its own connections, one per
server worker (a ConnectionGroup; they reconnect after fork). DataLoader
hands `__getitems__` a whole batch of indices; runs of consecutive requests
for the same run and detector become one request split over all server
workers, and the items are leases on the shared-memory slots themselves
(`Frame.lease`), which DataLoader's collate copies into its batch at once.
That saves the copy and the page faults of a private array per frame. A
lease holds its slot for as long as the item, or any view of it, is
referenced, so a collate_fn that keeps items sees them unchanged; the slot
goes back to the server when the last reference goes. When the leases still
held would leave too little of a connection's window, the batch is copied
instead. `dataset[i]` always returns a private copy.

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

from . import legacy
from .connection import Client
from .group import ConnectionGroup

Request = Tuple[Any, ...]   # (exp, run, access_mode, detector_name, event)


class IPCRemotePsanaDataset(Dataset):
    def __init__(self, server_address: Any, requests_list: Sequence[Request],
                 mode: str = "calib", protocol: str = "auto", transport: str = "auto",
                 timeout: Optional[float] = 300.0) -> None:
        """
        server_address: (host, port), "host:port", a UNIX socket path, or None
            for $PSANA_IPC_ADDRESS.
        requests_list: tuples (exp, run, access_mode, detector_name, event).
        mode: raw, calib, image or mask. protocol: "auto", "v1" or "legacy".
        """
        if protocol not in ("auto", "v1", "legacy"):
            raise ValueError("protocol must be 'auto', 'v1' or 'legacy'")
        self.server_address = server_address
        self.requests_list = requests_list
        self.mode = mode
        self.protocol = protocol
        self.timeout = timeout
        self._auto = protocol == "auto"
        self._group = ConnectionGroup(server_address, transport=transport, writable=True,
                                      timeout=timeout)
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
        """A DataLoader batch of leased frames (see the module docstring); copies
        instead when the leases still held would leave too little of the window."""
        requests = [self.requests_list[i] for i in indices]
        if self._dialect() == "legacy" or not self._room_for(len(requests)):
            return [self.fetch_event(*r) for r in requests]
        items: List[Optional[np.ndarray]] = [None] * len(requests)
        base = 0
        for (exp, run, access, det), group in groupby(requests, key=lambda r: tuple(r[:4])):
            events = [r[4] for r in group]
            split = self._group.submit(exp, run, det, events, self.mode, access)
            for pos, frame in self._group.stream(split):
                items[base + pos] = frame.lease()
            base += len(events)
        return items

    def close(self) -> None:
        """Drop this process's connections (they reconnect on the next fetch)."""
        self._group.close()

    def _room_for(self, n: int) -> bool:
        clients = self._group.clients
        share = -(-n // len(clients))
        return all(c.leased + share <= c.server_window() for c in clients)


class RunDataset(IPCRemotePsanaDataset):
    """One detector of one run as a map-style dataset: item i is event `events[i]`
    (all of the run's events by default)."""

    def __init__(self, server_address: Any, exp: str, run: int, detector: str,
                 mode: str = "calib", events: Optional[Sequence[int]] = None,
                 transport: str = "auto", timeout: Optional[float] = 300.0) -> None:
        if events is None:
            with Client(server_address, transport=transport, timeout=timeout) as client:
                events = range(client.info(exp, run, detector)["events"])
        super().__init__(server_address, [(exp, run, "idx", detector, int(e)) for e in events],
                         mode=mode, protocol="v1", transport=transport, timeout=timeout)
        self.exp, self.run, self.detector = exp, run, detector
