"""`IPCRemotePsanaDataset`: the btx dataset, same signature and items, over
v1 when the server speaks it and the legacy dialect otherwise.

Each process (each DataLoader worker) keeps its own connections, one per
server worker (a ConnectionGroup; they reconnect after fork), all of one
connection group, whose id is fixed when the dataset is made. DataLoader
hands `__getitems__` a whole batch of indices; runs of consecutive requests
for the same run and detector become one request split over all server
workers. On the server's host, a batch of one detector is a batch buffer
of the group in the server's pool (batch_ring.PoolBuffer): the server's
workers write each frame in place, with the fields asked beside it in the
reply, and the client copies nothing; the next epoch's workers fill the
same buffers again (the server keeps them for the group). Otherwise each
frame is received straight into its row of a reused batch buffer of this
process (inline, from another host) or copied there once from the
server's memory. Either way the items are rows of that buffer, which the
default collate hands on as the batch itself (batch_collate), through
workers as a handle (batch_handoff). Read in order, the next batches are
hinted to the server's frame cache (read_ahead). `dataset[i]` always
returns a private copy.

Several servers serving the same runs (`server_address` a list, or
addresses separated by commas; v1 only) share every batch among their
workers, and a server lost on the way is left out, its frames asked of the
others (group.py).

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
import logging
import warnings
from itertools import groupby
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, get_worker_info

from psana_ipc.protocol.errors import BAD_ARENA, NO_MEMORY, UNAUTHORIZED, ServerError
from psana_ipc.protocol.legacy import is_ours
from psana_ipc.protocol.messages import MODES, Into

from . import legacy
from .batch_collate import RingBatch
from .batch_ring import BatchRing, GroupBuffers, MemfdBuffer
from .client import Codes, chosen_events
from .field_values import decode_values, padded_stack
from .group import ConnectionGroup, rows_of
from .read_ahead import SequentialReadAhead

log = logging.getLogger(__name__)
Request = Tuple[Any, ...]   # (exp, run, access_mode, detector_name, event)
# Frames each connection may hold: the client copies and releases each frame at
# once, so a few suffice, and DataLoader workers that live one epoch then cost
# the server a few fresh slots per connection rather than one per frame in flight.
WINDOW = 8


class IPCRemotePsanaDataset(Dataset):
    """btx's dataset of detector frames, served by an iserver: item i is the frame
    (a numpy array) of `requests_list[i]`. Plug it into a torch DataLoader.

    Args:
        server_address: (host, port), "host:port", a UNIX socket path, or None
            for $PSANA_IPC_ADDRESS (else the ready file in $PSANA_IPC_READY_FILE);
            or several servers serving the same runs, as a list or separated
            by commas (they speak v1).
        requests_list: tuples (exp, run, access_mode, detector_name, event).
        mode: "raw", "calib", "image" or "mask".
        protocol: "auto" (v1 when the server speaks it, else btx's legacy
            dialect; the fallback is logged), "v1" or "legacy".
        transport: "auto" (shared memory on this host, else inline), "shm" or
            "inline".
        timeout: seconds to wait for a reply.
        buffers: batches drawn before a dropped batch's memory is reused (the
            lifetime rule in the module docstring); 0: fresh memory every batch.

    Item lifetime: a DataLoader batch is a reused buffer that is never
    overwritten while anything refers to it (see the module docstring);
    `dataset[i]` is a private copy. `close()` drops the connections (also
    done when the dataset is garbage collected).
    """
    fields: Optional[List[str]] = None     # other detectors' values beside each frame

    def __init__(self, server_address: Any, requests_list: Sequence[Request],
                 mode: str = "calib", protocol: str = "auto", transport: str = "auto",
                 timeout: Optional[float] = 300.0, buffers: int = 2) -> None:
        if protocol not in ("auto", "v1", "legacy"):
            raise ValueError("protocol must be 'auto', 'v1' or 'legacy'")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.server_address = server_address
        self.requests_list = requests_list
        self.mode = mode
        self.protocol = protocol
        self.timeout = timeout
        self._auto = protocol == "auto"
        self._group = ConnectionGroup(server_address, transport=transport, window=WINDOW,
                                      timeout=timeout)
        if len(self._group.servers) > 1:
            if protocol == "legacy":
                raise ValueError("the legacy dialect reaches one server; several speak v1")
            self.protocol = "v1"
        self._ring = BatchRing(MemfdBuffer, buffers)
        self._read_ahead = SequentialReadAhead(requests_list, self._group, mode)
        self._pool_ring = BatchRing(GroupBuffers(self._group), buffers) if buffers else None
        self._specs: Dict[Tuple[Any, ...], Any] = {}
        if len(requests_list):
            try:
                if self._dialect() == "v1":
                    self._group.connect()       # the group id DataLoader workers inherit
                    exp, run, _, det = requests_list[0][:4]
                    self._spec(exp, run, det)   # and the frames' spec, which they would each ask
            except (OSError, ServerError):
                pass   # not reachable yet, or refused: each process finds out on its first fetch

    def __len__(self) -> int:
        return len(self.requests_list)

    def _dialect(self) -> str:
        if self.protocol == "auto":
            wait = legacy.PROBE_TIMEOUT if self.timeout is None \
                else min(self.timeout, legacy.PROBE_TIMEOUT)
            self.protocol = legacy.probe(self._group.address, self.requests_list[0], self.mode,
                                         wait)
            if self.protocol == "legacy":
                log.info("the server at %s is an older btx server: using its legacy dialect",
                         self._group.address)
        return self.protocol

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.fetch_event(*self.requests_list[idx])

    def fetch_event(self, exp: str, run: Any, access_mode: str, detector_name: str,
                    event: int) -> np.ndarray:
        """One event's frame as a private array (btx's method of the same name)."""
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
        split = self._group.submit(exp, run, detector_name, [event], self.mode, access_mode,
                                   self.fields)
        for _, frame in self._group.stream(split):
            with frame:
                array = frame.array if frame.private else np.array(frame.array)
                values = frame.values
        self._group.flush_releases()
        return (array, values) if self.fields else array

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        """A DataLoader batch: rows of one ring batch (see the module docstring)."""
        requests = [self.requests_list[i] for i in indices]
        if self._dialect() == "legacy":
            return [self.fetch_event(*r) for r in requests]
        self._read_ahead.follow(indices)
        items = self._in_arena(requests)
        return items if items is not None else self._assemble(requests)

    def _in_arena(self, requests: List[Request]) -> Optional[List[Any]]:
        """The batch's items, written in place into a batch buffer, or None
        where that cannot be: several detectors in one batch, no shared
        memory, no room in the budget (warned once), or frames unlike the
        detector's spec."""
        keys = {tuple(r[:4]) for r in requests}
        if self._pool_ring is None or len(keys) != 1 or len(self._group.servers) > 1:
            return None
        exp, run, access, det = keys.pop()
        if self._group.clients[0].server.transport != "shm":
            return None
        spec = self._spec(exp, run, det)
        if spec is None:
            return None
        shape, dtype = spec
        try:
            batch = RingBatch(self._pool_ring, (len(requests),) + shape, dtype)
        except ServerError as e:
            if e.code != NO_MEMORY:
                raise
            why = f"no room for batch buffers ({e.message}); copying frames instead"
            if get_worker_info() is None:
                warnings.warn(why)
            else:
                log.info("DataLoader worker: %s", why)   # every epoch's workers would warn again
            self._pool_ring = None
            return None
        buffer = batch.buffer

        def into(start: int, count: int) -> Into:
            return buffer.into(start, count, shape, dtype)
        try:
            frames = self._group.wait(self._group.submit(exp, run, det, [r[4] for r in requests],
                                                         self.mode, access, self.fields,
                                                         into=into))
        except ServerError as e:
            if e.code != BAD_ARENA:
                raise
            return None
        rows = batch.rows()
        if not self.fields:
            return rows
        values = {pos: decode_values(frame.desc.values) for pos, frame in frames}
        return list(zip(rows, collatable([values[k] for k in range(len(rows))])))

    def _spec(self, exp: str, run: Any, det: str) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
        """(shape, dtype) of the detector's frames in this mode, asked once;
        None if it has no such mode."""
        if (exp, run, det) not in self._specs:
            modes = self._group.ask(lambda client: client.info(exp, run, det))["modes"]
            spec = modes.get(self.mode)
            self._specs[exp, run, det] = None if spec is None else \
                (tuple(spec["shape"]), np.dtype(spec["dtype"]))
        return self._specs[exp, run, det]

    def _assemble(self, requests: List[Request]) -> List[np.ndarray]:
        """Every frame once in its row of a ring batch: received there when it
        comes inline, else copied from the server's memory, which is released
        at once. A batch of one detector is laid out from its spec before
        anything arrives. Frames unlike the first in shape or dtype cannot
        share a tensor: such a batch gets private arrays, which collate
        rejects as torch does for any dataset."""
        batch: Optional[RingBatch] = None
        keys = {tuple(r[:4]) for r in requests}
        if len(keys) == 1:
            exp, run, _, det = next(iter(keys))
            spec = self._spec(exp, run, det)
            if spec is not None:
                batch = RingBatch(self._ring, (len(requests),) + spec[0], spec[1])
        odd = {}
        values: Dict[int, Dict[str, np.ndarray]] = {}
        base = 0
        for (exp, run, access, det), group in groupby(requests, key=lambda r: tuple(r[:4])):
            events = [r[4] for r in group]
            split = self._group.submit(exp, run, det, events, self.mode, access, self.fields,
                                       land=rows_of(batch.array[base:]) if batch else None)
            for pos, frame in self._group.stream(split):
                with frame:
                    if batch is None:
                        batch = RingBatch(self._ring, (len(requests),) + frame.array.shape,
                                          frame.array.dtype)
                    if not frame.landed and batch.fits(frame.array):
                        np.copyto(batch.array[base + pos], frame.array, casting="no")
                    elif not frame.landed:
                        odd[base + pos] = np.array(frame.array)
                    if self.fields:
                        values[base + pos] = frame.values
            base += len(events)
        self._group.flush_releases()
        if odd:
            items = [odd.get(k, np.array(batch.array[k])) for k in range(len(requests))]
        else:
            items = batch.rows()
        if self.fields:
            return list(zip(items, collatable([values[k] for k in range(len(requests))])))
        return items

    def close(self) -> None:
        """Drop this process's batch buffers and connections (they reconnect on
        the next fetch; the group's buffers in the server go with its last
        connection)."""
        if self._pool_ring is not None:
            self._pool_ring.close()
        self._ring.close()
        self._group.close()


def collatable(per_event: List[Dict[str, np.ndarray]]) -> List[Dict[str, Any]]:
    """A batch's field values as DataLoader's default collate can batch them:
    values whose shape differs from event to event padded alike (see
    `padded_stack`), strings as str and records as {member: value}."""
    if not per_event:
        return []
    rows = {name: list(padded_stack([values[name] for values in per_event]))
            for name in per_event[0]}
    return [{name: plain(rows[name][k]) for name in rows} for k in range(len(per_event))]


def plain(value: np.ndarray) -> Any:
    if value.dtype.names:
        return {name: value[name].item() for name in value.dtype.names}
    if value.dtype.kind == "U":
        return value.tolist()
    return value


class RunDataset(IPCRemotePsanaDataset):
    """One detector of one run as a map-style dataset: item i is the frame of
    event `events[i]` (by default every event that holds the detector). With
    `fields` an item is `(frame, {name: value})`, which DataLoader batches
    into `(frames, {name: values})`, the frames still one ring batch (strings
    become lists of str, records dicts of their members, and values whose
    shape varies are padded with zeros to the batch's largest).

    Args:
        server_address: as for IPCRemotePsanaDataset.
        exp, run, detector: the run and detector (`psana-ipc info EXP RUN`),
            or a field served as frames by its name ("ebeam.ebeamPhotonEnergy").
        mode: "raw", "calib", "image", "mask", "waveforms" or "padded"; checked
            against the detector at construction (one `info` call).
        events: event indices (default: every event that holds the detector).
        transport, timeout, buffers: as for IPCRemotePsanaDataset.
        fields: per-event values beside each frame (see `Client.get`), e.g.
            "ebeam.ebeamPhotonEnergy", "scan.motor1", "sum(hsd.calib)".
        skip_incomplete: the default events are those holding every field's
            detector too (as LCLStreamer's skip_incomplete_events).
        event_codes: {"with": [codes], "without": [codes]}: only the events the
            timing system's event codes choose (e.g. laser on: {"with": [40]}).
        step: only the events of this step of a scan (see `Client.steps`).

    Raises:
        ValueError: a mode the detector does not have.
        ServerError: an unknown run or detector, a run without timing codes
            (with `event_codes`) or without the step.
    """

    def __init__(self, server_address: Any, exp: str, run: int, detector: str,
                 mode: str = "calib", events: Optional[Sequence[int]] = None,
                 transport: str = "auto", timeout: Optional[float] = 300.0,
                 buffers: int = 2, fields: Optional[Sequence[str]] = None,
                 skip_incomplete: bool = False, event_codes: Codes = None,
                 step: Optional[int] = None) -> None:
        servers = ConnectionGroup(server_address, transport=transport, timeout=timeout)
        try:
            info = servers.ask(lambda client: client.info(exp, run, detector))
            if mode not in info["modes"]:
                raise ValueError(f"{detector} has no {mode!r} mode; it has "
                                 f"{', '.join(sorted(info['modes']))}")
            events = servers.ask(lambda client: chosen_events(
                client, exp, run, detector, events, fields, skip_incomplete, event_codes, step))
        finally:
            servers.close()
        super().__init__(server_address, [(exp, run, "idx", detector, int(e)) for e in events],
                         mode=mode, protocol="v1", transport=transport, timeout=timeout,
                         buffers=buffers)
        self.exp, self.run, self.detector = exp, run, detector
        self.fields = list(fields) if fields else None
