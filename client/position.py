"""Where training stands in an epoch: the state a loader saves beside the
model's checkpoint, and the cursor that keeps it.

The state is small and JSON-serializable (no event lists): the epoch, the
order's settings (seed, shuffle and its generator, padding, drop_last), a
fingerprint of the event list, and the *consumed* position, the first
`events_done` positions of the epoch's global order (client/epoch_order.py)
that the training loop has been handed on every rank. Ranks advance in
lockstep, so the state of any one rank, taken after a step every rank took
(rank 0's is simplest), resumes every rank of a new world: each calls
`load_state_dict(state)` with its own rank and world size.

A state taken when a rank has consumed its whole share points at the start
of the next epoch, so `for epoch in range(loader.epoch, epochs)` goes on
from a checkpoint whether it was taken mid-epoch or between epochs.
"""
import hashlib
import io
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np

from .epoch_order import PADDINGS, generator_name, global_order, rank_positions

FORMAT = "psana-ipc/epoch-position"
VERSION = 1
# The settings that make the order: a state saved with others cannot resume this loader.
ORDER_SETTINGS = ("seed", "shuffle", "generator", "padding", "drop_last")


class StateError(ValueError):
    """A saved position that cannot resume this loader; `code` says why:
    not_a_state, other_version, other_events, other_order, followed (a
    loader following a live run)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def fingerprint(items: Iterable[Any]) -> str:
    """A short digest of an event list (ints, or btx request tuples), the same in
    every process and Python version."""
    digest = hashlib.sha256()
    if isinstance(items, (range, np.ndarray)) or all(isinstance(i, (int, np.integer))
                                                     for i in items):
        digest.update(b"events:" + np.asarray(list(items), dtype="<i8").tobytes())
    else:
        for item in items:     # numpy integers as ints: their repr changes between versions
            fields = [int(f) if isinstance(f, (int, np.integer)) else str(f) for f in item]
            digest.update(json.dumps(fields).encode() + b"\n")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Position:
    """One loader's consumed position, as saved (see the module docstring)."""
    epoch: int
    seed: int
    shuffle: bool
    generator: str
    padding: str
    drop_last: bool
    events: int
    fingerprint: str
    events_done: int
    batches_done: int
    batch_size: int
    world_size: int

    def to_state(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_state(cls, state: Any) -> "Position":
        if not (isinstance(state, dict) and state.get("format") == FORMAT):
            raise StateError("not_a_state", "this is not a psana-ipc loader position "
                                            "(state_dict() of BatchLoader or ElasticSampler)")
        if state.get("version") != VERSION:
            raise StateError("other_version", f"this position has format version "
                                              f"{state.get('version')}; this psana-ipc reads "
                                              f"version {VERSION}")
        try:
            return cls(**{name: state[name] for name in cls.__dataclass_fields__})
        except KeyError as e:
            raise StateError("not_a_state", f"this position lacks its {e.args[0]!r} entry") \
                from None

    def describe(self) -> str:
        """One line for people: where a resume starts."""
        share = f"{self.events_done} of {self.events} events done"
        percent = f" ({100 * self.events_done / self.events:.0f}%)" if self.events else ""
        order = f"seed {self.seed}, shuffled" if self.shuffle else "in order"
        return (f"epoch {self.epoch}: {share}{percent}, {self.batches_done} batches of "
                f"{self.batch_size} per rank on {self.world_size} ranks; {order}, "
                f"padding {self.padding}, events {self.fingerprint}")


def find_state(obj: Any) -> Optional[Dict[str, Any]]:
    """The first loader position inside a checkpoint (nested dicts and lists,
    e.g. a StatefulDataLoader's state_dict), or None."""
    if isinstance(obj, dict):
        if obj.get("format") == FORMAT:
            return obj
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return None
    for child in children:
        found = find_state(child)
        if found is not None:
            return found
    return None


def read_checkpoint(path: Union[str, "os.PathLike[str]"]) -> Any:
    """A checkpoint file: JSON, or what torch.save wrote (read with torch,
    tensors only, when torch is installed)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError:
        pass
    try:
        import torch
    except ImportError:
        raise StateError("not_a_state", "not JSON, and reading a torch checkpoint needs "
                                        "torch") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        raise StateError("not_a_state", "neither JSON nor a torch checkpoint of tensors and "
                                        "plain values") from None


def where(checkpoint: Any) -> Position:
    """Where a saved position stands (`.epoch`, `.events_done`, `.describe()`),
    from the state itself, a checkpoint that holds it anywhere inside, or the
    path of a checkpoint file (read_checkpoint)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    state = find_state(checkpoint)
    if state is None:
        raise StateError("not_a_state", "no psana-ipc loader position in this checkpoint "
                                        "(save the loader's state_dict() in it)")
    return Position.from_state(state)


class EpochCursor:
    """The order and the consumed position of one rank of a loader: what
    BatchLoader and ElasticSampler share. `share()` is this rank's part of
    the epoch from where it stands; `consumed(n)` counts events of it handed
    to the training loop; `state_dict()` / `load_state_dict()` save and
    resume (see the module docstring)."""

    def __init__(self, events: int, fingerprint_of: Any, seed: int, shuffle: bool,
                 padding: str, drop_last: bool, batch_size: int, rank: int,
                 world_size: int) -> None:
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {padding!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self._fingerprint_of = fingerprint_of      # a callable, computed once when needed
        self._fingerprint: Optional[str] = None
        self.rank, self.world_size = rank, world_size
        # where the current (or next) pass begins
        self._start = Position(epoch=0, seed=int(seed), shuffle=bool(shuffle),
                               generator=generator_name(), padding=padding,
                               drop_last=bool(drop_last), events=int(events), fingerprint="",
                               events_done=0, batches_done=0, batch_size=int(batch_size),
                               world_size=world_size)
        self._taken = 0                      # events of this rank's share consumed since
        self._complete = False               # this rank's share of the epoch is consumed
        self._resuming = False               # the next pass starts at the loaded position

    @property
    def epoch(self) -> int:
        return self._start.epoch

    def set_epoch(self, epoch: int) -> None:
        """The next pass is `epoch` from its start, unless a loaded position
        stands in that epoch: then it goes on from there."""
        if epoch != self._start.epoch:
            self._start = replace(self._start, epoch=int(epoch), events_done=0, batches_done=0)
            self._taken = 0
            self._complete = False
            self._resuming = False

    def _next_start(self) -> Position:
        """Where the next pass begins: a loaded position once, else the epoch's start."""
        if self._resuming:
            return self._start
        return replace(self._start, events_done=0, batches_done=0)

    def share(self) -> np.ndarray:
        """This rank's positions of the event list for the next pass."""
        p = self._next_start()
        order = global_order(p.events, p.epoch, p.seed, p.shuffle)
        return rank_positions(order, p.events_done, self.rank, self.world_size,
                              p.batch_size, p.padding, p.drop_last)

    def begin(self) -> np.ndarray:
        """Start a pass and return this rank's share of it (see `share`)."""
        share = self.share()
        self._start = self._next_start()
        self._taken = 0
        self._complete = False
        self._resuming = False
        return share

    def consumed(self, n: int) -> None:
        """`n` more events of this rank's share were handed to the training loop."""
        self._taken += n

    def finished(self) -> None:
        """This rank's share of the epoch is consumed: a state now points at
        the start of the next epoch."""
        self._complete = True

    def current(self) -> Position:
        """The consumed position; once this rank's share is consumed, the start
        of the next epoch."""
        return self.position_at(self._taken, self._complete)

    def position_at(self, taken: int, complete: bool = False) -> Position:
        """The position once `taken` events of this pass's share were consumed
        (`complete`: all of it, which points at the next epoch)."""
        p = replace(self._start, world_size=self.world_size, fingerprint=self.fingerprint())
        if complete:
            return replace(p, epoch=p.epoch + 1, events_done=0, batches_done=0)
        return replace(p, events_done=min(p.events, p.events_done + taken * self.world_size),
                       batches_done=p.batches_done + math.ceil(taken / p.batch_size))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._fingerprint_of())
        return self._fingerprint

    def state_dict(self) -> Dict[str, Any]:
        """The consumed position (JSON-serializable)."""
        return self.current().to_state()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from a state saved by any rank of any world size; refused
        (StateError) for another event list or another order."""
        saved = Position.from_state(state)
        mine = self.current()
        if (saved.events, saved.fingerprint) != (mine.events, mine.fingerprint):
            raise StateError("other_events", f"this position was saved for {saved.events} "
                                             f"events (fingerprint {saved.fingerprint}); this "
                                             f"loader has {mine.events} (fingerprint "
                                             f"{mine.fingerprint}): resume on the same events")
        differ = [name for name in ORDER_SETTINGS if getattr(saved, name) != getattr(mine, name)]
        if differ:
            said = ", ".join(f"{name}={getattr(saved, name)!r}" for name in differ)
            raise StateError("other_order", f"this position was saved with {said}; make the "
                                            f"loader with the same settings to resume it")
        self._start = replace(saved, batch_size=mine.batch_size)
        self._taken = 0
        self._complete = False
        self._resuming = True
