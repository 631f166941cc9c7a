"""`IPCRemotePsanaDataset`: the btx dataset, same signature and items, over
v1 when the server speaks it and the legacy dialect otherwise.

Each process (each DataLoader worker) keeps its own connections, one per
server worker (a ConnectionGroup; they reconnect after fork). DataLoader
hands `__getitems__` a whole batch of indices; runs of requests for the
same detector become one request split over all server workers, and each
frame is copied once, straight from its slot, into a reused batch buffer
(batch_ring); the items are rows of that buffer, which the default collate
hands on as the batch itself (batch_collate), through workers as a handle
(batch_handoff). Without DataLoader workers, on the server's host, a batch
of one detector is a batch arena instead (client/arena.py): the server's
workers write each frame in place and the client copies nothing.
`dataset[i]` always returns a private copy.

Lifetime rule: a batch is never overwritten while anything refers to it (the
tensor, a view or slice, an array made from it); without workers it also
stays unchanged until `buffers` more batches have been drawn once dropped.
Code that keeps every batch stays correct (the ring grows), so `.clone()` is
never needed for correctness; `buffers=0` gives every batch fresh memory.
"""
import warnings
from itertools import groupby
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, get_worker_info

from psana_ipc.protocol.errors import BAD_ARENA, NO_MEMORY, ServerError

from . import batch_handoff, legacy
from .arena import arena_buffer
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
        self._group = ConnectionGroup(server_address, transport=transport, window=WINDOW,
                                      timeout=timeout)
        self._ring = BatchRing(buffers, batch_handoff.claim)
        self._arenas = BatchRing(buffers, make=arena_buffer(self._group)) if buffers else None
        self._specs: Dict[Tuple[Any, ...], Any] = {}

    def __len__(self) -> int:
        return len(self.requests_list)

    def _dialect(self) -> str:
        if self.protocol == "auto":
            self.protocol = legacy.detect_protocol(self._group.address)
        return self.protocol

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.fetch_event(*self.requests_list[idx])

    def fetch_event(self, exp: str, run: Any, access_mode: str, detector_name: str,
                    event: int) -> np.ndarray:
        if self._dialect() == "legacy":
            return legacy.fetch(self._group.address, exp, run, access_mode, detector_name,
                                event, self.mode, self.timeout)
        return self._group.clients[0].get(exp, run, detector_name, event, self.mode,
                                          access_mode)

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        """A DataLoader batch: rows of one ring batch (see the module docstring)."""
        requests = [self.requests_list[i] for i in indices]
        if self._dialect() == "legacy":
            return [self.fetch_event(*r) for r in requests]
        batch = self._in_arena(requests)
        return batch.rows() if batch is not None else self._assemble(requests)

    def _in_arena(self, requests: List[Request]) -> Optional[RingBatch]:
        """The batch written in place into an arena, or None where that cannot
        be: in a DataLoader worker (batches go to another process), several
        detectors in one batch, no shared memory, no room in the budget
        (warned once), or frames unlike the detector's spec."""
        keys = {tuple(r[:4]) for r in requests}
        if self._arenas is None or get_worker_info() is not None or len(keys) != 1:
            return None
        exp, run, access, det = keys.pop()
        if self._group.clients[0].server["transport"] != "shm":
            return None
        if (exp, run, det) not in self._specs:
            modes = self._group.clients[0].info(exp, run, det)["modes"]
            self._specs[exp, run, det] = modes.get(self.mode)
        spec = self._specs[exp, run, det]
        if spec is None:
            return None
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        try:
            batch = RingBatch(self._arenas, (len(requests),) + shape, dtype)
        except ServerError as e:
            if e.code != NO_MEMORY:
                raise
            warnings.warn(f"no room for batch arenas ({e.message}); copying frames instead")
            self._arenas = None
            return None
        stride = batch.array[0].nbytes
        name = batch.buffer.name

        def into(start: int, count: int) -> Dict[str, Any]:
            return {"arena": name, "offsets": [(start + i) * stride for i in range(count)],
                    "shape": list(shape), "dtype": dtype.str}
        try:
            self._group.wait(self._group.submit(exp, run, det, [r[4] for r in requests],
                                                self.mode, access, into))
        except ServerError as e:
            if e.code != BAD_ARENA:
                raise
            return None
        return batch

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
