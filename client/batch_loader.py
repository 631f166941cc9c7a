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

Sharding follows torch's DistributedSampler: each epoch's order (shuffled
with `seed + epoch` when asked) is padded by wrapping around to a multiple
of the world size, then rank r takes every world-th event from r, so every
rank yields the same number of batches.
"""
import math
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, ServerError

from .arena import ArenaRing
from .connection import Client, Frame
from .distributed import rank_and_world, shard
from .group import ConnectionGroup


def epoch_order(events: Sequence[int], epoch: int, seed: int, shuffle: bool, rank: int,
                world: int) -> List[int]:
    """This rank's events for one epoch (see the module docstring)."""
    order = np.asarray(events, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng(seed + epoch).permutation(order)
    padded = np.resize(order, math.ceil(len(order) / world) * world) if len(order) else order
    return [int(e) for e in shard(padded, rank, world)]


class BatchLoader:
    """Iterable of (batch, *frame shape) tensors (or numpy arrays) of one detector."""

    def __init__(self, address: Any = None, exp: str = "", run: int = 0, detector: str = "",
                 mode: str = "calib", events: Optional[Sequence[int]] = None,
                 batch_size: int = 32, *, shuffle: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_last: bool = False, connections: int = 0, depth: int = 2,
                 buffers: int = 2, output: str = "torch", pin_memory: Optional[bool] = None,
                 transport: str = "auto", access_mode: str = "idx",
                 arenas: Optional[bool] = None) -> None:
        """`arenas`: True to require batch arenas, False to always copy, None
        (default) for arenas wherever they can be had (see the module docstring)."""
        if output not in ("torch", "numpy"):
            raise ValueError("output must be 'torch' or 'numpy'")
        if batch_size < 1 or depth < 1 or buffers < 0:
            raise ValueError("batch_size and depth must be >= 1, buffers >= 0")
        if arenas and not buffers:
            raise ValueError("batch arenas are reused: they need buffers >= 1")
        self.exp, self.run, self.detector, self.mode = exp, int(run), detector, mode
        self.access_mode = access_mode
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.depth = depth
        self.output = output
        self.epoch = 0
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.rank, self.world_size = rank, world_size
        window = min(64, max(8, 2 * batch_size))
        self.group = ConnectionGroup(address, connections, transport=transport, window=window)
        info = self.group.clients[0].info(exp, run, detector)
        spec = info["modes"].get(mode)
        if spec is None:
            raise ValueError(f"{detector} has no {mode!r} mode; it has {sorted(info['modes'])}")
        self.frame_shape = tuple(spec["shape"])
        self.dtype = np.dtype(spec["dtype"])
        self.events = list(range(info["events"])) if events is None else [int(e) for e in events]
        self.pin_memory = pin_memory
        self.buffers = buffers
        self.arenas = arenas if buffers else False
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
        n = len(self._order())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -- buffers --------------------------------------------------------------------------
    def _pin(self) -> bool:
        if self.output == "numpy":
            return False
        import torch
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory

    def _new_buffer(self) -> Any:
        shape = (self.batch_size,) + self.frame_shape
        if self.output == "numpy":
            return np.empty(shape, self.dtype)
        import torch
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
        if self.arenas is False or self.group.clients[0].server["transport"] != "shm":
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
    def _batches(self, into: Optional[Callable[[int], Callable[[int, int], Dict[str, Any]]]]
                 = None) -> Iterator[Tuple[int, List[int], List[Tuple[Client, int, int]]]]:
        """(batch number, events, the group's requests) with `depth` batches asked
        ahead, batch k written `into(k)` when given. Abandoning it mid-epoch
        drops the connections, which frees their slots and arenas."""
        order = self._order()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        in_flight: List[List[Tuple[Client, int, int]]] = []
        completed = False
        try:
            for k, events in enumerate(batches):
                while len(in_flight) < self.depth and k + len(in_flight) < len(batches):
                    ahead = k + len(in_flight)
                    in_flight.append(self.group.submit(self.exp, self.run, self.detector,
                                                       batches[ahead], self.mode,
                                                       self.access_mode,
                                                       into(ahead) if into else None))
                yield k, events, in_flight.pop(0)
            completed = True
        finally:
            if completed:
                self.group.flush_releases()
            else:
                self.close()

    def __iter__(self) -> Iterator[Any]:
        """Batches in arenas or reused buffers (see the buffer lifetime rule)."""
        ring = self._arenas()
        first = self._drawn       # ring places count on across epochs
        if ring is not None:
            for k, events, requests in self._batches(lambda k: ring.into(first + k)):
                self.group.wait(requests)
                self._drawn += 1
                yield self._output(ring.batch(first + k, len(events)))
            return
        for k, events, requests in self._batches():
            self._drawn += 1
            out = self._buffer(first + k, len(events))
            target = out.numpy() if self.output == "torch" else out
            for pos, frame in self.group.stream(requests):
                with frame:
                    np.copyto(target[pos], frame.array, casting="no")
            yield out

    def views(self) -> Iterator[List[Frame]]:
        """Zero-copy: each batch as a list of `Frame`s whose read-only `.array` is
        the server's slot itself, in order. They are valid until the next batch
        is drawn, when the loader releases them; copy what you keep."""
        for _, events, requests in self._batches():
            frames: List[Optional[Frame]] = [None] * len(events)
            for pos, frame in self.group.stream(requests):
                frames[pos] = frame
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
