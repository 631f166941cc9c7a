"""`BatchLoader`: batches for training loops, as fast as the server's workers
can produce frames.

It splits every batch over a ConnectionGroup (one connection per server
worker) and keeps the next batches' requests in flight. On the server's
host, every batch is a batch arena (client/arena.py): the server's workers
write each frame straight into its place in it, and the batch is a tensor
over the arena, with no copy in the client. Elsewhere (frames inline), or
when the server's budget has no room for the arenas, each frame is copied
once from its slot into a reused batch buffer. No DataLoader worker
processes, no pickling, no collate copy.

Buffer lifetime rule, the same for both: a yielded batch stays valid until
`buffers` further batches have been drawn (arenas and buffers are pinned
when CUDA is available); `.clone()` (or `.copy()`) what you keep longer, or
pass `buffers=0` for a fresh tensor every batch (copied, never an arena).

Sharding follows torch's DistributedSampler exactly: each epoch's order
(with torch present, shuffled by `torch.randperm` seeded with `seed + epoch`,
as DistributedSampler does; without torch, by numpy) is padded by wrapping
around to a multiple of the world size, then rank r takes every world-th
event from r, so every rank yields the same number of batches and the same
events DistributedSampler would give it.

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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, ServerError
from psana_ipc.protocol.messages import Into

from .arena import ArenaRing
from .connection import Client, Codes, Frame, chosen_events, stack_values
from .optional import require
from .distributed import rank_and_world, shard
from .follow import TIMEOUT, Follower, written_info
from .group import ConnectionGroup


def permutation(n: int, seed: int) -> np.ndarray:
    """DistributedSampler's shuffle of range(n) for `seed` (numpy's without torch)."""
    try:
        import torch
    except ImportError:
        return np.random.default_rng(seed).permutation(n)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).numpy()


def epoch_order(events: Sequence[int], epoch: int, seed: int, shuffle: bool, rank: int,
                world: int) -> List[int]:
    """This rank's events for one epoch (see the module docstring)."""
    order = np.asarray(events, dtype=np.int64)
    if shuffle:
        order = order[permutation(len(order), seed + epoch)]
    padded = np.resize(order, math.ceil(len(order) / world) * world) if len(order) else order
    return [int(e) for e in shard(padded, rank, world)]


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
            $PSANA_IPC_READY_FILE, else 127.0.0.1:5000).
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
        drop_last: drop this rank's last, incomplete batch.
        connections: connections to the server (default 0: one per server worker).
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
        arenas: True to require batch arenas, False to always copy, None
            (default) for arenas wherever they can be had (see the module
            docstring); never with `fields` or `skip_incomplete`.
        follow: True to follow the run as it is written (see the module
            docstring), or a dict of `Client.follow`'s options (start, policy,
            timeout, next_runs, poll); not with `events`, `shuffle` or `step`.

    Raises:
        ValueError: a bad option, or a mode the detector does not have.
        ServerError: the server refused the run or detector (`.code` says why).
        ConnectionError: no server at `address`.
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
                 step: Optional[int] = None, follow: Union[bool, Dict[str, Any]] = False) -> None:
        if follow and (events is not None or shuffle or step is not None):
            raise ValueError("a followed run is read in order as it is written: neither "
                             "events, shuffle nor step")
        if output not in ("torch", "numpy"):
            raise ValueError("output must be 'torch' or 'numpy'")
        if batch_size < 1 or depth < 1 or buffers < 0 or read_ahead < 0:
            raise ValueError("batch_size and depth must be >= 1, buffers and read_ahead >= 0")
        if arenas and not buffers:
            raise ValueError("batch arenas are reused: they need buffers >= 1")
        if arenas and (fields or skip_incomplete):
            raise ValueError("batch arenas take neither fields nor skip_incomplete "
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
        self.epoch = 0
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.rank, self.world_size = rank, world_size
        window = min(64, max(8, 2 * batch_size))
        self.group = ConnectionGroup(address, connections, transport=transport, window=window)
        self.follow = dict(follow) if isinstance(follow, dict) else ({} if follow else None)
        self.event_codes = event_codes
        self.follower: Optional[Follower] = None     # the follow of the last iteration
        if self.follow is None:
            info = self.group.clients[0].info(exp, run, detector)
        else:
            info = written_info(self.group.clients[0], exp, run, detector, mode,
                                self.follow.get("timeout", TIMEOUT))
        spec = info["modes"].get(mode)
        if spec is None:
            raise ValueError(f"{detector} has no {mode!r} mode; it has {sorted(info['modes'])}")
        self.frame_shape = tuple(spec["shape"])
        self.dtype = np.dtype(spec["dtype"])
        if self.follow is None:
            self.events = chosen_events(self.group.clients[0], exp, run, detector, events,
                                        fields, skip_incomplete, event_codes, step)
        self.pin_memory = pin_memory
        self.buffers = buffers
        self.arenas = arenas if buffers and not (fields or skip_incomplete) else False
        self._ring: List[Any] = []
        self._arena_ring: Optional[ArenaRing] = None
        self._drawn = 0

    # -- sizes and epochs ---------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next iteration (call it every epoch, as with
        DistributedSampler)."""
        self.epoch = epoch

    def _order(self) -> List[int]:
        order = epoch_order(self.events, self.epoch, self.seed, self.shuffle, self.rank,
                            self.world_size)
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        return order

    def __len__(self) -> int:
        if self.follow is not None:
            raise TypeError("a followed run's length is known only once it has ended")
        n = len(self._order())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -- buffers --------------------------------------------------------------------------
    def _pin(self) -> bool:
        if self.output == "numpy":
            return False
        torch = require("torch", "torch", "BatchLoader(output='torch')")
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory

    def _new_buffer(self) -> Any:
        shape = (self.batch_size,) + self.frame_shape
        if self.output == "numpy":
            return np.empty(shape, self.dtype)
        torch = require("torch", "torch", "BatchLoader(output='torch')")
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, self.dtype)).dtype,
                           pin_memory=self._pin())

    def _buffer(self, k: int, n: int) -> Any:
        if not self.buffers:
            return self._new_buffer()[:n]
        if not self._ring:
            self._ring = [self._new_buffer() for _ in range(self.buffers)]
        return self._ring[k % len(self._ring)][:n]

    def _arenas(self) -> Optional[ArenaRing]:
        """The ring of batch arenas (made again after the connections were
        dropped), or None for the copy path. Enough arenas that the server
        writes the `depth` batches asked ahead while the last `buffers`
        drawn stay intact."""
        if self._arena_ring is not None and self._arena_ring.alive():
            return self._arena_ring
        if self._arena_ring is not None:
            self._arena_ring.close()
            self._arena_ring = None
        if self.arenas is False or self.group.clients[0].server.transport != "shm":
            if self.arenas:
                raise ValueError("batch arenas need shared memory with the server (same host)")
            return None
        try:
            self._arena_ring = ArenaRing(self.group, self.buffers + self.depth - 1,
                                         self.frame_shape, self.dtype, self.batch_size,
                                         self._pin())
        except ServerError as e:
            if self.arenas or e.code != NO_MEMORY:
                raise
            warnings.warn(f"no room for batch arenas ({e.message}); copying frames instead")
            self.close()           # gives back the arenas made so far
            self.arenas = False
        return self._arena_ring

    def _output(self, batch: np.ndarray) -> Any:
        if self.output == "numpy":
            return batch
        import torch
        return torch.from_numpy(batch)

    # -- iteration ------------------------------------------------------------------------
    def _batches(self, into: Optional[Callable[[int], Callable[[int, int], Into]]]
                 = None) -> Iterator[Tuple[int, List[int], List[Tuple[Client, int, int]]]]:
        """(batch number, events, the group's requests) with `depth` batches asked
        ahead, batch k written `into(k)` when given. Abandoning it mid-epoch
        drops the connections, which frees their slots and arenas."""
        if self.follow is not None:
            yield from self._followed(into)
            return
        order = self._order()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        in_flight: List[List[Tuple[Client, int, int]]] = []
        completed = False
        hinted = 0
        try:
            for k, events in enumerate(batches):
                while len(in_flight) < self.depth and k + len(in_flight) < len(batches):
                    ahead = k + len(in_flight)
                    in_flight.append(self.group.submit(self.exp, self.run, self.detector,
                                                       batches[ahead], self.mode,
                                                       self.access_mode, self.fields,
                                                       self.skip_incomplete,
                                                       into=into(ahead) if into else None))
                hinted = self._hint(batches, hinted, k + len(in_flight))
                yield k, events, in_flight.pop(0)
            completed = True
        finally:
            self._end_iteration(completed)

    def _end_iteration(self, completed: bool) -> None:
        """A completed iteration sends its releases; one abandoned drops the
        connections, which frees their slots and arenas."""
        if completed:
            self.group.flush_releases()
        else:
            self.close()

    def _followed(self, into: Optional[Callable[[int], Callable[[int, int], Into]]]
                  = None) -> Iterator[Tuple[int, List[int], List[Tuple[Client, int, int]]]]:
        """As `_batches`, for a run followed as it is written: each batch asked
        for once its events are (see client/follow.py), none ahead."""
        self.follower = Follower(self.group.clients[0], self.exp, self.run, self.detector,
                                 self.mode, fields=self.fields,
                                 skip_incomplete=self.skip_incomplete,
                                 event_codes=self.event_codes,
                                 share=(self.rank, self.world_size), **self.follow)
        completed = False
        try:
            for k, (run, events) in enumerate(self.follower.batches(self.batch_size)):
                yield k, events, self.group.submit(self.exp, run, self.detector, events,
                                                   self.mode, self.access_mode, self.fields,
                                                   self.skip_incomplete,
                                                   into=into(k) if into else None)
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
        """Batches in arenas or copied into the reused buffers (see the buffer
        lifetime rule); with `fields`, `(batch, {name: values})`. A batch the
        server skipped events of (`skip_incomplete`) is shorter, and a fresh
        copy."""
        ring = self._arenas()
        first = self._drawn       # ring places count on across epochs
        bar = self._progress_bar()
        try:
            if ring is not None:
                for k, events, requests in self._batches(lambda k: ring.into(first + k)):
                    self.group.wait(requests)
                    self._drawn += 1
                    if bar is not None:
                        bar.update(len(events))
                    yield self._output(ring.batch(first + k, len(events)))
                return
            for k, events, requests in self._batches():
                self._drawn += 1
                out = self._buffer(first + k, len(events))
                target = out.numpy() if self.output == "torch" else out
                values = {}
                for pos, frame in self.group.stream(requests):
                    with frame:
                        np.copyto(target[pos], frame.array, casting="no")
                        values[pos] = frame.values
                if bar is not None:
                    bar.update(len(events))
                if not values:
                    continue
                if len(values) < len(events):
                    out = out[sorted(values)]
                if self.fields:
                    yield out, self._batched([values[pos] for pos in sorted(values)])
                else:
                    yield out
        finally:
            if bar is not None:
                bar.close()

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
        for _, events, requests in self._batches():
            slots: List[Optional[Frame]] = [None] * len(events)
            for pos, frame in self.group.stream(requests):
                slots[pos] = frame
            frames = [frame for frame in slots if frame is not None]
            try:
                yield frames
            finally:
                for frame in frames:
                    frame.release()

    def close(self) -> None:
        """Drop the connections and with them the arenas (both are made again
        on the next iteration)."""
        self.group.close()
        if self._arena_ring is not None:
            self._arena_ring.close()
            self._arena_ring = None

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
