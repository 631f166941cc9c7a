"""`IPCRemotePsanaDataset`: the btx dataset, same signature and items, over
v1 when the server speaks it and the legacy dialect otherwise.

Each DataLoader worker process gets its own persistent connection (the
client reconnects after fork). `__getitems__`, which DataLoader calls with a
whole batch of indices, turns runs of requests for the same detector into a
single pipelined `get`.
"""
from itertools import groupby
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from . import legacy
from .connection import Client

Request = Tuple[Any, ...]   # (exp, run, access_mode, detector_name, event)


class IPCRemotePsanaDataset(Dataset):
    def __init__(self, server_address: Any, requests_list: Sequence[Request],
                 mode: str = "calib", protocol: str = "auto", transport: str = "auto",
                 timeout: Optional[float] = 300.0) -> None:
        """
        server_address: (host, port), "host:port", or a UNIX socket path.
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
        self._client = Client(server_address, transport=transport, timeout=timeout)

    def __len__(self) -> int:
        return len(self.requests_list)

    def _dialect(self) -> str:
        if self.protocol == "auto":
            self.protocol = legacy.detect_protocol(self._client.address)
        return self.protocol

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.fetch_event(*self.requests_list[idx])

    def fetch_event(self, exp: str, run: Any, access_mode: str, detector_name: str,
                    event: int) -> np.ndarray:
        if self._dialect() == "legacy":
            return legacy.fetch(self._client.address, exp, run, access_mode, detector_name, event,
                                self.mode, self.timeout)
        return self._client.get(exp, run, detector_name, event, self.mode, access_mode)

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        requests = [self.requests_list[i] for i in indices]
        if self._dialect() == "legacy":
            return [self.fetch_event(*r) for r in requests]
        items: List[np.ndarray] = []
        for (exp, run, access, det), group in groupby(requests, key=lambda r: tuple(r[:4])):
            events = [r[4] for r in group]
            batch = self._client.get_many(exp, run, det, events, self.mode, access_mode=access)
            items.extend(batch)
        return items
