"""Following a run while the DAQ writes it: its events in order, as they land.

    for ev in client.follow("tstx00117", 30, "epix10k2M", "calib"):
        model(ev.frame)            # ev.run, ev.event, ev.timestamp, ev.lag, ev.skipped

A `Follower` asks the server where the run stands (`follow`: the detector's
events past the last one it got, answered at once) and fetches what is new;
when nothing is, it asks again `poll` seconds later. That interval is the
only wait added to the DAQ's own: the server never holds a request for a
run to grow.

A consumer slower than the run chooses a `policy`:

    every    every event, in order; it falls behind, and `lag` (on each event
             and on the follower) says by how many of the detector's events
             written after it
    latest   at each look only the newest event; the others are skipped and
             counted (`skipped`), so the delay stays that of one event

The follow ends by itself, and `reason` says why: the run ended (EndRun
written, or its files renamed), or it stopped growing without an EndRun
(the DAQ stopped) for `timeout` seconds, or it did not begin within
`timeout`. With `next_runs`, it goes on to the experiment's next run instead
(waiting up to `timeout` for one to appear).

`share=(k, n)` keeps only every n-th of the detector's events from the k-th
(by their place among the events holding the detector): n followers, e.g.
DataLoader workers or ranks, split one stream without repeats. A finished
run is followed too: its events, then the end.
"""
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import BAD_ARENA, NOT_FOUND, ServerError
from psana_ipc.protocol.messages import CodeFilter, Follow
from psana_ipc.protocol.replies import RunProgress

log = logging.getLogger(__name__)
EVERY, LATEST = "every", "latest"
POLL = 0.05          # seconds between looks when the run has nothing new
TIMEOUT = 60.0       # seconds a run may stop growing without an EndRun, or take to begin
ENDED = {"end_run": "its EndRun was written", "renamed": "its files were renamed (complete)",
         "finished": "it was complete"}


@dataclass(frozen=True)
class LiveEvent:
    """One event of a followed run: its frame (a private array) and the
    values of the fields asked for; `lag`: the detector's events written
    after it when it was fetched; `skipped`: events left out so far."""
    run: int
    event: int
    frame: np.ndarray
    timestamp: Any
    lag: int
    skipped: int
    values: Dict[str, np.ndarray] = field(default_factory=dict)


class Follower:
    """A run followed as it is written (see the module docstring); made by
    `Client.follow`, `LiveRunDataset` and `BatchLoader(follow=True)`."""

    def __init__(self, client: Any, exp: str, run: int, detector: str, mode: str = "calib",
                 start: int = 0, *, policy: str = EVERY, timeout: float = TIMEOUT,
                 next_runs: bool = False, fields: Optional[List[str]] = None,
                 skip_incomplete: bool = False, event_codes: Optional[Dict[str, Any]] = None,
                 share: Tuple[int, int] = (0, 1), poll: float = POLL) -> None:
        if policy not in (EVERY, LATEST):
            raise ValueError(f"policy must be {EVERY!r} or {LATEST!r}")
        if timeout <= 0 or poll <= 0 or start < 0:
            raise ValueError("timeout and poll must be > 0, start >= 0")
        if not 0 <= share[0] < share[1]:
            raise ValueError("share must be (k, n) with 0 <= k < n")
        self.client = client
        self.exp, self.run, self.detector, self.mode = exp, int(run), detector, mode
        self.policy, self.timeout, self.next_runs, self.poll = policy, timeout, next_runs, poll
        self.fields = list(fields or [])
        self.skip_incomplete = skip_incomplete
        self.codes = None if event_codes is None else CodeFilter.parse(event_codes)
        self.share = share
        self._after = start - 1
        self.lag = 0           # the detector's events written after the last one handed out
        self.skipped = 0       # events left out (policy latest)
        self.reason = ""       # why the follow ended, once it has
        self.waiting = ""      # what a follow waits for when the server cannot answer
        self.progress: Optional[RunProgress] = None    # the last answer

    # -- where the run stands ---------------------------------------------------------------
    def _look(self, next_run: bool) -> Optional[RunProgress]:
        """The server's answer (naming the next run if `next_run`); None while
        the run does not exist (yet) or the server cannot be reached (it may
        be restarting), saying which in `waiting`."""
        try:
            self.progress = self.client.call(Follow(self.exp, self.run, self.detector,
                                                    self._after, self.codes, next_run))
        except (ServerError, ConnectionError) as e:
            if not self._reconnecting(e):
                if getattr(e, "code", None) != NOT_FOUND:
                    raise
                self.waiting = f"run {self.run} of {self.exp} did not begin"
            return None
        return self.progress

    def _reconnecting(self, error: Exception) -> bool:
        """Whether `error` is the server gone or restarted, which the next
        look connects again to (a restarted server issues new connection
        groups: the connection asks for a new one, as it holds no batch buffer)."""
        if isinstance(error, ServerError) and error.code != BAD_ARENA:
            return False
        self.client.group = None
        self.waiting = f"the server could not be reached ({error})"
        return True

    def ready(self, newest: int = 1) -> Iterator[Tuple[int, List[Tuple[int, int]]]]:
        """(run, [(place, event)]) to hand out, in order, as they are written,
        `place` being the event's among those holding the detector (policy
        latest: the `newest` of each look); ends when the follow does
        (`reason`)."""
        since = time.monotonic()        # when the server last answered, or the run began
        over: Optional[float] = None    # when this run was first seen over
        while True:
            found = self._look(self.next_runs and over is not None)
            if found is None:
                if time.monotonic() - since >= self.timeout:
                    return self._end(f"{self.waiting} within {self.timeout:g} s")
                time.sleep(self.poll)
                continue
            since = time.monotonic()
            if found.events:
                events = self._chosen(found, newest)
                self._after = found.events[-1]
                if events:
                    yield self.run, events
                continue
            ending = self._ending(found)
            if ending is None:
                over = None
            elif not self.next_runs:
                return self._end(ending)
            elif found.next_run >= 0:
                log.info("%s; following run %d next", ending, found.next_run)
                self.run, self._after, over = found.next_run, -1, None
                continue
            else:
                over = over or time.monotonic()
                if time.monotonic() - over >= self.timeout:
                    return self._end(f"{ending}; no later run of {self.exp} began within "
                                     f"{self.timeout:g} s")
            time.sleep(self.poll)

    def _chosen(self, found: RunProgress, newest: int) -> List[Tuple[int, int]]:
        """This share's (place, event) of an answer, all or the `newest`;
        skips counted."""
        k, n = self.share
        mine = [(found.position + i, e) for i, e in enumerate(found.events)
                if (found.position + i) % n == k]
        if self.policy == LATEST and len(mine) > newest:
            self.skipped += len(mine) - newest
            mine = mine[-newest:]
        return mine

    def lag_after(self, place: int) -> int:
        """The detector's events written after the one at `place`, as last
        told; noted as the follower's `lag`."""
        self.lag = max(0, self.progress.held - place - 1)
        return self.lag

    def _ending(self, found: RunProgress) -> Optional[str]:
        """Why the follow of this run ends, all its events out; None while it may grow."""
        run = f"run {self.run} of {self.exp}"
        if not found.live:
            return f"{run} ended: {ENDED.get(found.ended, found.ended)}"
        if found.idle >= self.timeout:
            return (f"{run} stopped growing: nothing written for {found.idle:.0f} s and no "
                    f"EndRun (the DAQ may have stopped)")
        return None

    def _end(self, reason: str) -> None:
        self.reason = reason
        log.info("follow ended: %s", reason)

    # -- what it hands out ------------------------------------------------------------------
    def __iter__(self) -> Iterator[LiveEvent]:
        """Every event handed out, its frame fetched (pipelined, then copied).
        A connection lost on the way (the server restarting) is taken up
        again after the last event handed out."""
        for run, events in self.ready():
            places = {e: place for place, e in events}
            last = events[0][1] - 1
            try:
                rid = self.client.submit(self.exp, run, self.detector, list(places), self.mode,
                                         fields=self.fields,
                                         skip_incomplete=self.skip_incomplete)
                for frame in self.client.frames(rid):
                    with frame:
                        event = LiveEvent(run, frame.event, np.array(frame.array),
                                          frame.reply.desc.timestamp,
                                          self.lag_after(places[frame.event]), self.skipped,
                                          frame.values if self.fields else {})
                    last = event.event
                    yield event
                self.client.flush_releases()
            except (ServerError, ConnectionError) as e:
                if not self._reconnecting(e):
                    raise
                self._after = last        # the next look lists the rest again

    def batches(self, size: int) -> Iterator[Tuple[int, List[int]]]:
        """(run, events) of `size` events (fewer at the end of a run), as
        they are written: a batch waits until it is full (policy latest: of
        the newest events). `lag` is noted for each batch's last event."""
        run, batch = self.run, []
        for found_run, events in self.ready(size):
            if found_run != run and batch:
                yield run, [e for _, e in batch]
                batch = []
            run = found_run
            batch += events
            while len(batch) >= size:
                self.lag_after(batch[size - 1][0])
                yield run, [e for _, e in batch[:size]]
                batch = batch[size:]
        if batch:
            self.lag_after(batch[-1][0])
            yield run, [e for _, e in batch]


def written_info(client: Any, exp: str, run: int, detector: str, mode: str,
                 timeout: float, poll: float = POLL) -> Dict[str, Any]:
    """The detector's info once its run holds a frame of it in `mode` (the
    frame's shape is known then): a run followed from its start may not have
    begun yet, or hold no event of the detector, for up to `timeout`
    seconds. After that, the info as it is (or the server's not_found)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = client.info(exp, run, detector)
        except ServerError as e:
            if e.code != NOT_FOUND or time.monotonic() >= deadline:
                raise
        else:
            if mode in info["modes"] or not info.get("live") or time.monotonic() >= deadline:
                return info
        time.sleep(poll)
