"""`BatchLoader`: batches for training loops, as fast as the server's workers
can produce frames.

It splits every batch over a ConnectionGroup (one connection per server
worker) and keeps the next batches' requests in flight. On the server's
host, every batch is a batch buffer of the loader's group in the server's
pool (batch_ring.PoolBuffer): the server's workers write each frame, and
the fields asked beside it, straight into its place, and the batch is a
tensor over the buffer, with no copy in the client. A new loader on a
server that served before reuses memory that is there already. From
another host (frames inline) each frame is received straight into its row
of a reused buffer of this process; with several servers, or when the
server's budget has no room for the buffers, each frame in shared memory
is copied once into its row. No DataLoader worker processes, no pickling,
no collate copy.

Several servers (`address` a list, or addresses separated by commas, e.g.
one per CPU node of a job, all serving the same runs): every batch is
spread over the workers of all of them; a server lost mid-epoch is left
out and the frames it owed are asked of the others (group.py).

Buffer lifetime rule, the same for both: a batch is never overwritten while
anything refers to it (the tensor, a view of it), and stays unchanged until
`buffers` further batches have been drawn even after it is dropped (buffers
are pinned when CUDA is available); `buffers=0` gives a fresh tensor every
batch (copied, never in the server's pool).

Order and position (client/epoch_order.py, client/position.py): each
epoch's global order depends only on the seed, the epoch and the events
(with torch present, shuffled by `torch.randperm` seeded with `seed + epoch`,
as DistributedSampler does; without torch, by numpy); rank r takes every
world-th event of it from r. `state_dict()` is the position the training
loop has consumed, and `load_state_dict()` resumes it mid-epoch on any
number of ranks, without reading anything again. With `padding="wrap"`
every rank yields the events DistributedSampler would give it.

Mixed rates: by default the loader iterates over the events that hold the
detector. `fields` (per-event values, e.g. "ebeam.ebeamPhotonEnergy",
"scan.motor1", "sum(hsd.calib)": see `Client.get`) makes each batch
`(frames, {name: values})`, numbers batched as tensors (arrays), strings and
records as numpy arrays, values whose shape varies padded with zeros to the
batch's largest; `skip_incomplete` also leaves out the events lacking a
field's detector, as LCLStreamer's skip_incomplete_events. `event_codes` and
`step` choose events by the timing system's codes and by scan step.

Live runs: with `follow`, the loader follows the run while the DAQ writes it
(client/follow.py): each batch is the next `batch_size` events of the
detector as they are written (policy "every"), or the newest ones (policy
"latest", the others skipped and counted); iteration ends with the run.
Ranks split the stream (rank r takes every world-th event from the r-th),
nothing is asked ahead, and `follower` tells the lag, the skips and why the
follow ended.
"""
import math
import warnings
import functools
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, ServerError
from psana_ipc.protocol.messages import frame_nbytes

from .batch_ring import BatchRing, Buffer, GroupBuffers, MemfdBuffer, PoolBuffer
from .client import Codes, chosen_events
from .field_values import decode_values, stack_values
from .frame import Frame
from .distributed import rank_and_world
from .follow import TIMEOUT, Follower, written_info
from .group import ConnectionGroup, Share, rows_of
from .optional import require
from .position import EpochCursor, StateError


class Batch(NamedTuple):
    """A batch in flight: its array, the group's requests for its frames, and
    whether the server writes them in place."""
    array: Optional[np.ndarray]
    requests: List[Share]
    in_place: bool


class BatchLoader:
    """Batches of one detector of one run, shaped (batch, *frame shape), as torch
    tensors (or numpy arrays), straight from an iserver.

    Use it where a DataLoader over a dataset of frames would go:

        loader = BatchLoader("127.0.0.1:5000", "xpptut15", 14, "epix10k2M",
                             batch_size=32, shuffle=True, progress=True)
        for epoch in range(10):
            loader.set_epoch(epoch)
            for batch in loader:
                train_step(batch.to("cuda", non_blocking=True))

    Args:
        address: the server: (host, port), "host:port", a UNIX socket path, or
            None for $PSANA_IPC_ADDRESS (else the ready file in
            $PSANA_IPC_READY_FILE, else 127.0.0.1:5000); or several servers
            serving the same runs, as a list or separated by commas.
        exp: experiment name, e.g. "xpptut15".
        run: run number.
        detector: detector name (`psana-ipc info EXP RUN` lists them), or a field
            served as frames by its name ("ebeam.ebeamPhotonEnergy").
        mode: "raw", "calib", "image", "mask", "waveforms" or "padded"; checked
            against the server at once.
        events: event indices to draw from (default: every event holding the detector).
        batch_size: frames per batch; the last batch may be smaller unless
            `drop_last`.
        shuffle: a new order every epoch, the same as torch's DistributedSampler
            gives for `seed` and the epoch set with `set_epoch`.
        seed: the shuffle's seed; the same on every rank.
        rank, world_size: this process's share of the events (default: from
            torch.distributed, torchrun's RANK/WORLD_SIZE or srun's
            SLURM_PROCID/SLURM_NTASKS, else 0 and 1).
        drop_last: only whole steps (a full batch on every rank); the rest of
            the epoch's events are left out.
        padding: "none" (every event once per epoch; at the epoch's end a rank
            may have one batch fewer than others) or "wrap" (DistributedSampler's:
            the first events again, until every rank has as many).
        connections: connections to each server (default 0: one per server worker).
        depth: batches asked for ahead of the one being consumed.
        buffers: batch buffers reused in turn (see the buffer lifetime rule in
            the module docstring); 0 makes a fresh tensor for every batch.
        output: "torch" or "numpy".
        pin_memory: pin the buffers for fast copies to the GPU (default: when
            CUDA is available).
        transport: "auto" (shared memory on this host, else inline), "shm" or
            "inline".
        access_mode: the btx access mode of the run ("idx").
        progress: show a tqdm progress bar per epoch (needs tqdm, in
            psana-ipc[torch]).
        read_ahead: batches after the ones in flight whose events the server is
            told of, so a server with a frame cache reads them while idle.
        fields: other detectors' per-event values beside each frame, e.g.
            "ebeam.ebeamPhotonEnergy"; batches are then `(frames, {name: values})`.
        skip_incomplete: leave out the events lacking a field's detector.
        event_codes: {"with": [codes], "without": [codes]}: only the events the
            timing system's event codes choose (e.g. laser off: {"without": [40]}).
        step: only the events of this step of a scan (see `Client.steps`).
        arenas: True to require batches written in place in the server's
            pool, False to always copy, None (default) for in place wherever
            it can be had (one server, on this host; see the module
            docstring); never with `skip_incomplete`.
        follow: True to follow the run as it is written (see the module
            docstring), or a dict of `Client.follow`'s options (start, policy,
            timeout, next_runs, poll); not with `events`, `shuffle` or `step`.

    Raises:
        ValueError: a bad option, or a mode the detector does not have.
        ServerError: the server refused the run or detector (`.code` says why).
        ConnectionError: no server at `address` (with several, once none is left).
    """

    def __init__(self, address: Any, exp: str, run: int, detector: str,
                 mode: str = "calib", events: Optional[Sequence[int]] = None,
                 batch_size: int = 32, *, shuffle: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_last: bool = False, connections: int = 0, depth: int = 2,
                 buffers: int = 2, output: str = "torch", pin_memory: Optional[bool] = None,
                 transport: str = "auto", access_mode: str = "idx",
                 progress: bool = False, read_ahead: int = 8,
                 fields: Optional[Sequence[str]] = None, skip_incomplete: bool = False,
                 arenas: Optional[bool] = None, event_codes: Codes = None,
                 step: Optional[int] = None, padding: str = "none",
                 follow: Union[bool, Dict[str, Any]] = False) -> None:
        if follow and (events is not None or shuffle or step is not None):
            raise ValueError("a followed run is read in order as it is written: neither "
                             "events, shuffle nor step")
        if output not in ("torch", "numpy"):
            raise ValueError("output must be 'torch' or 'numpy'")
        if batch_size < 1 or depth < 1 or buffers < 0 or read_ahead < 0:
            raise ValueError("batch_size and depth must be >= 1, buffers and read_ahead >= 0")
        if arenas and not buffers:
            raise ValueError("batch buffers in the server's pool are reused: they need "
                             "buffers >= 1")
        if arenas and skip_incomplete:
            raise ValueError("batches written in place take no skip_incomplete "
                             "(use arenas=None or False)")
        self.exp, self.run, self.detector, self.mode = exp, int(run), detector, mode
        self.access_mode = access_mode
        self.fields = list(fields or [])
        self.skip_incomplete = skip_incomplete
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.depth = depth
        self.read_ahead = read_ahead
        self.output = output
        self.progress = progress
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.rank, self.world_size = rank, world_size
        window = min(64, max(8, 2 * batch_size))
        self.group = ConnectionGroup(address, connections, transport=transport, window=window)
        self.follow = dict(follow) if isinstance(follow, dict) else ({} if follow else None)
        self.event_codes = event_codes
        self.follower: Optional[Follower] = None     # the follow of the last iteration
        if self.follow is None:
            info = self.group.ask(lambda client: client.info(exp, run, detector))
        else:
            info = written_info(self.group.clients[0], exp, run, detector, mode,
                                self.follow.get("timeout", TIMEOUT))
        spec = info["modes"].get(mode)
        if spec is None:
            raise ValueError(f"{detector} has no {mode!r} mode; it has {sorted(info['modes'])}")
        self.frame_shape = tuple(spec["shape"])
        self.dtype = np.dtype(spec["dtype"])
        self.padding = padding
        self.events = [] if self.follow is not None else self.group.ask(
            lambda client: chosen_events(client, exp, run, detector, events, fields,
                                         skip_incomplete, event_codes, step))
        self.pin_memory = pin_memory
        self.buffers = buffers
        self.arenas = arenas if buffers and not skip_incomplete else False
        self._ring: Optional[BatchRing] = None

    # -- order, epochs and position -----------------------------------------------------
    @property
    def events(self) -> List[int]:
        return self._events

    @events.setter
    def events(self, events: Sequence[int]) -> None:
        """Another event list: its own order, from the start of the current epoch."""
        epoch = self._cursor.epoch if hasattr(self, "_cursor") else 0
        self._events = [int(e) for e in events]
        self._cursor = EpochCursor(len(self._events), lambda: self._events, self.seed,
                                   self.shuffle, self.padding, self.drop_last, self.batch_size,
                                   self.rank, self.world_size)
        self._cursor.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next iteration (call it every epoch, as with
        DistributedSampler). The epoch a loaded position stands in goes on
        from that position."""
        self._cursor.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """The position the training loop has consumed (never how far the
        loader has asked ahead): small and JSON-serializable, to save beside
        the model's checkpoint. Any one rank's, taken after a step every rank
        took, resumes every rank of a new world. A followed run has none
        (StateError `followed`)."""
        self._not_followed()
        return self._cursor.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Make the next iteration go on from a saved position, on this loader's
        rank and world size (which may differ from the saver's). Raises
        StateError (`.code`) for a position of other events or another order."""
        self._not_followed()
        self._cursor.load_state_dict(state)

    def _not_followed(self) -> None:
        if self.follow is not None:
            raise StateError("followed", "a followed run has no saved position: to go on "
                                         "after a restart, follow again from the event after "
                                         "the last one used (follow={'start': event})")

    def _order(self) -> List[int]:
        """This rank's events for the next iteration."""
        return [self.events[p] for p in self._cursor.share()]

    def __len__(self) -> int:
        if self.follow is not None:
            raise TypeError("a followed run's length is known only once it has ended")
        return math.ceil(len(self._cursor.share()) / self.batch_size)

    # -- buffers --------------------------------------------------------------------------
    def _pin(self) -> bool:
        if self.output == "numpy":
            return False
        torch = require("torch", "torch", "BatchLoader(output='torch')")
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory

    def _in_place(self) -> bool:
        """Whether batches are written in place in the server's pool."""
        if self.arenas is False or len(self.group.servers) > 1 \
                or self.group.clients[0].server.transport != "shm":
            if self.arenas:
                raise ValueError("batches written in place need shared memory with one "
                                 "server (on the same host)")
            return False
        return True

    def _buffers(self) -> BatchRing:
        """The ring of batch buffers (made again after the connections were
        dropped): in the server's pool (the `buffers + depth` a pass needs
        made at once; where the server has no room for them, the copy path
        from now on, warned), or this process's for the copy path."""
        if self._ring is not None:
            return self._ring
        if self._in_place():
            self._ring = BatchRing(GroupBuffers(self.group, wait=True), self.buffers,
                                   self.buffers + self.depth)
            nbytes = frame_nbytes((self.batch_size,) + self.frame_shape, self.dtype.itemsize)
            try:
                self._ring.fill(self.buffers + self.depth, nbytes, self._pin())
            except ServerError as e:
                if self.arenas or e.code != NO_MEMORY:
                    raise
                warnings.warn(f"no room for batch buffers in the server ({e.message}); "
                              f"copying frames instead")
                self._ring.close()
                self.arenas = False
        if not self._in_place():
            self._ring = BatchRing(MemfdBuffer, self.buffers)
        return self._ring

    def _lease(self, n: int) -> Tuple[Buffer, np.ndarray]:
        """A buffer for a batch of `n` frames, and the batch's array over it."""
        shape = (n,) + self.frame_shape
        buffer = self._buffers().lease(frame_nbytes(shape, self.dtype.itemsize), False,
                                       self._pin())
        return buffer, buffer.lease(shape, self.dtype)

    def _output(self, batch: np.ndarray) -> Any:
        if self.output == "numpy":
            return batch
        import torch
        return torch.from_numpy(batch)

    # -- iteration ------------------------------------------------------------------------
    def _submit(self, run: int, events: List[int], lease: bool) -> Batch:
        """Ask for one batch, written in place into its buffer where the ring's
        buffers are in the server's pool (with `lease`; without, only the
        requests)."""
        buffer, array = self._lease(len(events)) if lease else (None, None)
        into = (functools.partial(buffer.into, frame_shape=self.frame_shape, dtype=self.dtype)
                if isinstance(buffer, PoolBuffer) else None)
        land = rows_of(array) if array is not None and into is None else None
        return Batch(array, self.group.submit(self.exp, run, self.detector, events, self.mode,
                                              self.access_mode, self.fields,
                                              self.skip_incomplete, into=into, land=land),
                     into is not None)

    def _batches(self, lease: bool = True) -> Iterator[Tuple[List[int], Batch]]:
        """(events, the batch) with `depth` batches asked ahead (see `_submit`).
        Abandoning it mid-epoch drops the connections, which frees what they
        held."""
        if self.follow is not None:
            yield from self._followed(lease)
            return
        order = [self.events[p] for p in self._cursor.begin()]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        in_flight: List[Batch] = []
        completed = False
        hinted = 0
        try:
            for k, events in enumerate(batches):
                while len(in_flight) < self.depth and k + len(in_flight) < len(batches):
                    in_flight.append(self._submit(self.run, batches[k + len(in_flight)], lease))
                hinted = self._hint(batches, hinted, k + len(in_flight))
                yield events, in_flight.pop(0)
            completed = True
            self._cursor.finished()
        finally:
            self._end_iteration(completed)

    def _end_iteration(self, completed: bool) -> None:
        """A completed iteration sends its releases; one abandoned drops the
        connections, which frees what they held."""
        if completed:
            self.group.flush_releases()
        else:
            self.close()

    def _followed(self, lease: bool) -> Iterator[Tuple[List[int], Batch]]:
        """As `_batches`, for a run followed as it is written: each batch asked
        for once its events are (see client/follow.py), none ahead."""
        self.follower = Follower(self.group.clients[0], self.exp, self.run, self.detector,
                                 self.mode, fields=self.fields,
                                 skip_incomplete=self.skip_incomplete,
                                 event_codes=self.event_codes,
                                 share=(self.rank, self.world_size), **self.follow)
        completed = False
        try:
            for run, events in self.follower.batches(self.batch_size):
                yield events, self._submit(run, events, lease)
            completed = True
        finally:
            self._end_iteration(completed)

    def _hint(self, batches: List[List[int]], hinted: int, submitted: int) -> int:
        """Keep the server told of the `read_ahead` batches after those
        submitted (a server with a frame cache reads them ahead while idle);
        `hinted`: the first batch not told yet, which it returns updated."""
        start = max(hinted, submitted)
        end = min(len(batches), submitted + self.read_ahead)
        if end > start:
            self.group.prefetch(self.exp, self.run, self.detector, batches[start:end],
                                self.mode, self.access_mode)
        return end

    def __iter__(self) -> Iterator[Any]:
        """Batches written in place or copied into the reused buffers (see the
        buffer lifetime rule); with `fields`, `(batch, {name: values})`. A batch
        the server skipped events of (`skip_incomplete`) is shorter, and a
        fresh copy."""
        bar = self._progress_bar()
        try:
            for events, batch in self._batches():
                out = batch.array
                if batch.in_place:
                    values = {pos: decode_values(frame.desc.values)
                              for pos, frame in self.group.wait(batch.requests)}
                else:
                    values = self._copy(out, batch.requests)
                self._cursor.consumed(len(events))
                if bar is not None:
                    bar.update(len(events))
                if not values:
                    continue
                if len(values) < len(events):
                    out = out[sorted(values)]
                frames = self._output(out)
                yield (frames, self._batched([values[p] for p in sorted(values)])) \
                    if self.fields else frames
        finally:
            if bar is not None:
                bar.close()

    def _copy(self, out: np.ndarray, requests: List[Share]) -> Dict[int, Dict[str, np.ndarray]]:
        """Every frame of a batch in its row (copied there unless it was
        received there); the values of each."""
        values = {}
        for pos, frame in self.group.stream(requests):
            with frame:
                if not frame.landed:
                    np.copyto(out[pos], frame.array, casting="no")
                values[pos] = frame.values
        return values

    def _batched(self, per_event: List[Any]) -> Any:
        stacked = stack_values(per_event)
        if self.output == "torch":
            import torch
            return {name: torch.from_numpy(v) if v.dtype.kind in "biuf" else v
                    for name, v in stacked.items()}
        return stacked

    def _progress_bar(self) -> Any:
        if not self.progress:
            return None
        tqdm = require("tqdm.auto", "torch", "BatchLoader(progress=True)").tqdm
        total = None if self.follow is not None else len(self._order())
        return tqdm(total=total, unit=" frames",
                    desc=f"{self.detector} epoch {self.epoch}")

    def views(self) -> Iterator[List[Frame]]:
        """Zero-copy: each batch as a list of `Frame`s whose read-only `.array` is
        the server's slot itself, in order (`.values` holds the fields). They
        are valid until the next batch is drawn, when the loader releases them;
        copy what you keep."""
        for events, batch in self._batches(lease=False):
            slots: List[Optional[Frame]] = [None] * len(events)
            for pos, frame in self.group.stream(batch.requests):
                slots[pos] = frame
            frames = [frame for frame in slots if frame is not None]
            self._cursor.consumed(len(events))
            try:
                yield frames
            finally:
                for frame in frames:
                    frame.release()

    def close(self) -> None:
        """Drop the buffers and the connections (both are made again on the
        next iteration)."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self.group.close()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
