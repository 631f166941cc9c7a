"""`Client`: the requests an iserver answers, over one `Connection`
(client/connection.py).

Frames arrive in the server's pool (same host; client/pool.py maps it once
per process) or inline; `get`/`get_many` copy each frame in the pool once
and release it (releases travel in batches, all sent before the call
returns); `view` and `frames` hand out the pool's memory itself
(zero-copy), held until released. An inline frame is received straight
into where it is kept: the array `get` returns, the row of `get_many`'s
result, or a batch's row.

Zero-copy lifetime rule: the array of a `Frame` from `view` or `frames` is
valid until `Frame.release()` (or the end of its `with` block); after that
the server reuses the memory for another event. Copy what you keep.
"""
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.errors import OUT_OF_RANGE, UNKNOWN_DETECTOR, ProtocolError, ServerError
from psana_ipc.protocol.messages import (CodeFilter, FieldRef, Get, Info, Into, MakeArena, Ping,
                                         Prefetch, RunKey, Shutdown, Stats)
from psana_ipc.protocol.replies import ArenaMade, ErrorReply, FrameReply, InPool

from .connection import Connection, Land, Payload, WithPayload
from .discovery import find_token
from .field_values import decode_values, stack_values
from .follow import Follower
from .frame import Frame

Fields = Optional[Sequence[str]]
Codes = Optional[Dict[str, Sequence[int]]]     # {"with": [codes], "without": [codes]}
STEP = "step"          # the run-level info entry of a run's steps


def step_range(found: Dict[str, Any], step: int, exp: str, run: int) -> List[int]:
    """Step `step`'s events as a [start, stop, 1] range, from run-level info."""
    steps = found.get(STEP, {}).get("steps", [])
    if not 0 <= step < len(steps):
        raise ServerError(OUT_OF_RANGE, f"run {run} of {exp} has {len(steps)} steps; there is "
                                        f"no step {step}")
    return [steps[step][0], steps[step][1], 1]


def chosen_events(client: "Client", exp: str, run: int, detector: str,
                  events: Optional[Sequence[int]], fields: Fields, skip_incomplete: bool,
                  event_codes: Codes, step: Optional[int]) -> List[int]:
    """What a loader iterates over: `events` (default: those holding the
    detector, see `Client.events_with`), only those the event codes and the
    step choose."""
    if events is not None and event_codes is None and step is None:
        return [int(e) for e in events]
    held = client.events_with(exp, run, detector, fields,
                              skip_incomplete and events is None, event_codes, step)
    if events is None:
        return held
    kept = set(held)
    return [int(e) for e in events if int(e) in kept]


def fitting(row: np.ndarray, reply: FrameReply) -> Optional[np.ndarray]:
    """`row` if the frame a reply describes has its shape and dtype (then it
    can be received there), else None."""
    return row if (row.shape, row.dtype.str) == (reply.desc.shape, reply.desc.dtype) else None


class Client(Connection):
    """One connection to an iserver, giving frames as numpy arrays (no torch needed).

        with Client("127.0.0.1:5000") as c:
            frame = c.get("xpptut15", 14, "epix10k2M", 42, mode="calib")

    Args:
        address: (host, port), "host:port", a UNIX socket path ("unix:PATH" or
            any path with a "/"), or None for $PSANA_IPC_ADDRESS, else the
            server in the ready file $PSANA_IPC_READY_FILE, else 127.0.0.1:5000.
        transport: "auto" (shared memory on this host, else inline), "shm"
            (fail if the server cannot share memory with us) or "inline".
        token: the server's token (default: see `find_token`).
        window: frames this connection may hold unreleased (0: the server's
            default).
        writable: map the server's memory copy-on-write, for code that insists
            on writable arrays (torch.as_tensor); writes stay in this process.
        timeout: seconds to wait for a reply (None: forever).
        connect_timeout: seconds to wait for the connection.
        group: a connection group id the server issued to another connection
            (batch buffers, a fair share); without one, the server issues a new
            one (`Client.group` once connected).
        leader: that other connection, when this one should follow it into the
            new group a restarted server issues it (a loader's connections).

    It connects on first use (and again in a forked child). Errors the server
    replies with raise `ServerError` (`.code`, `.message`); no server, or a
    connection lost, raises `ConnectionError`. Frame lifetimes: see the
    module docstring. `close()` (or the `with` block) ends the connection; a
    client dropped without it closes its socket when garbage collected.
    """

    # -- requests -----------------------------------------------------------------------
    def server_window(self) -> int:
        """Frames this connection may hold at once, as agreed with the server."""
        self._ensure()
        return self.server.window

    def ping(self) -> bool:
        """True if the server answers (else ConnectionError)."""
        self.call(Ping())
        return True

    def info(self, exp: str, run: int, detector: Optional[str] = None,
             present: bool = False, event_codes: Codes = None) -> Dict[str, Any]:
        """Run-level (no detector): every detector with its kind, modes, fields
        and how many events hold it, and the run's EPICS PVs, scan variables
        and steps; for one detector its events and shapes per mode.
        `present`: also which events hold it, as [start, stop, step] ranges.
        `event_codes` ({"with": [codes], "without": [codes]}): count and list
        only the events the timing system's event codes choose."""
        codes = None if event_codes is None else CodeFilter.parse(event_codes)
        return self.call(Info(exp, int(run), detector, present, codes)).info

    def events_with(self, exp: str, run: int, detector: str, fields: Fields = None,
                    skip_incomplete: bool = False, event_codes: Codes = None,
                    step: Optional[int] = None) -> List[int]:
        """The events that hold `detector` and, with `skip_incomplete`, every
        field's detector too (a batch's `sum(...)` and the like excepted), in
        order: what loaders iterate over by default. `event_codes` keeps those
        the event codes choose (see `info`), `step` those of one step of a scan
        (counted from 0, see `steps`)."""
        ranges = [self.info(exp, run, detector, True, event_codes)["present"]]
        refs = [FieldRef.parse(f) for f in fields or ()] if skip_incomplete else []
        others = {ref.detector for ref in refs if ref.reduce is None}
        if others or step is not None:
            found = self.info(exp, run, present=True)["detectors"]
            unknown = sorted(others - set(found))
            if unknown:
                raise ServerError(UNKNOWN_DETECTOR, f"run {run} of {exp} has no detector "
                                                    f"{', '.join(unknown)}")
            ranges += [found[name]["present"] for name in others]
            if step is not None:
                ranges.append([step_range(found, step, exp, run)])
        held = set.intersection(*({e for r in rs for e in range(*r)} for rs in ranges))
        return sorted(held)

    def steps(self, exp: str, run: int) -> List[Dict[str, Any]]:
        """The run's steps in order (psana's `run.steps()`), each {"index",
        "events": range of event indices, "values": {scan variable: value at
        its BeginStep}}; empty for a run without steps."""
        found = self.info(exp, run)["detectors"].get(STEP)
        if found is None:
            return []
        return [{"index": k, "events": range(*bounds), "values": decode_values(values)}
                for k, (bounds, values) in enumerate(zip(found["steps"], found["values"]))]

    def follow(self, exp: str, run: int, detector: str, mode: str = "calib", start: int = 0,
               **options: Any) -> Follower:
        """A run followed while the DAQ writes it: iterate it for its events
        in order as they land (`LiveEvent`: run, event, frame, timestamp,
        lag, skipped, values), from event `start`; the iteration ends with
        the run, and `reason` says why. Options (see client/follow.py):
        policy "every" or "latest", timeout (seconds a run may stop growing
        without an EndRun, or take to begin), next_runs, fields,
        skip_incomplete, event_codes, share (k, n), poll."""
        return Follower(self, exp, run, detector, mode, start, **options)

    def stats(self) -> Dict[str, Any]:
        """The server's counters: workers, connections, requests, events, bytes,
        errors by code, shared memory in use, its peak and the budget."""
        return self.call(Stats()).stats

    def shutdown(self) -> None:
        """Stop the whole server (needs the server's token if it has one)."""
        self.call(Shutdown(find_token(self.token, self.address)))
        self.close()

    def submit(self, exp: str, run: int, detector: str, events: Sequence[int],
               mode: str = "calib", access_mode: str = "idx", fields: Fields = None,
               skip_incomplete: bool = False, into: Optional[Into] = None,
               land: Optional[Land] = None) -> int:
        """Ask for several events without waiting; read them with `frames(rid)`,
        or, written `into` a batch buffer, wait for them with `replies(rid)`.
        `fields` and `skip_incomplete`: see `get` (a get into a batch buffer
        takes no skip_incomplete). `land(reply)`: where a frame that comes
        inline is received (see `Land`; the frame is then `landed`). A get
        the server would refuse is answered as it would be, without being
        sent: its replies raise ServerError."""
        refs = tuple(FieldRef.parse(f) for f in fields or ())   # ProtocolError at once
        try:
            request = Get(RunKey(exp, int(run), detector, access_mode), mode,
                          tuple(int(e) for e in events), refs, skip_incomplete, into)
        except ProtocolError as e:
            return self._refused(e)
        rid = self.send(request)
        if land is not None:
            self._land[rid] = land
        return rid

    def frames(self, rid: int) -> Iterator[Frame]:
        """The frames of a submitted get, in request order (zero-copy: see the
        lifetime rule); events the server skipped (`skip_incomplete`) yield
        nothing. An error reply raises ServerError after the request's
        remaining replies are drained and their frames released."""
        for reply, payload in self.replies(rid):
            if isinstance(reply, FrameReply):
                yield self._frame(reply, payload)

    def replies(self, rid: int) -> Iterator[WithPayload]:
        """The successful replies to a submitted get (skipped events included),
        in request order; an error reply raises ServerError once the rest are
        drained (frames released)."""
        error = None
        while True:
            reply, payload = self.reply(rid)
            if isinstance(reply, ErrorReply):
                error = error or ServerError.from_reply(reply)
            elif error is not None:
                if isinstance(reply, FrameReply) and isinstance(reply.where, InPool):
                    self.release(reply.where.handle)
            else:
                yield reply, payload
            if reply.last:
                break
        if error is not None:
            raise error

    def free_arena(self, ticket: int) -> None:
        """Give a batch buffer back with the next message; no I/O, safe anywhere."""
        self._to_free.append(ticket)

    def make_arena(self, nbytes: int, wait: bool = True) -> ArenaMade:
        """A batch buffer of at least `nbytes` for this connection's group, which
        every connection of the group may fill (`.arena` names it; `.pool`,
        `.offset` and `.size` say where it is): an idle one of the group's,
        else a new one. It lives until the group's last connection closes, or
        `free_arena`. Without `wait`, ServerError `no_memory` at once when the
        budget has no room now."""
        return self.arena_made(self.ask_arena(nbytes, wait))

    def ask_arena(self, nbytes: int, wait: bool = True) -> int:
        """`make_arena` without waiting for its reply (buffers asked on several
        connections at once cost one round trip); the id `arena_made` takes."""
        return self.send(MakeArena(int(nbytes), wait))

    def arena_made(self, rid: int) -> ArenaMade:
        """The reply to `ask_arena`; an error reply raises ServerError."""
        return self._result(rid)

    def _frame(self, reply: FrameReply, payload: Optional[Payload]) -> Frame:
        dtype, shape, where = np.dtype(reply.desc.dtype), reply.desc.shape, reply.where
        if not isinstance(where, InPool):
            array = payload.array if payload is not None else np.empty(0, np.uint8)
            if array.shape != shape or array.dtype != dtype:
                array = array.reshape(-1).view(np.uint8).view(dtype).reshape(shape)
            return Frame(array, reply, self, landed=payload is not None and payload.landed)
        try:
            hold = self.pools.hold(where.pool, where.offset, where.size, where.ticket, reuse=True)
        except ConnectionError:
            self.release(where.handle)
            raise
        self._held.add(where.handle)
        array = self.pools.view(where.pool, where.offset, shape, dtype)
        return Frame(array, reply, self, where.handle, hold)

    def prefetch(self, exp: str, run: int, detector: str, events: Sequence[int],
                 mode: str = "calib", access_mode: str = "idx") -> None:
        """Tell the server these events come next, in this order: with a frame
        cache, its idle workers read them ahead. No reply to wait for."""
        if len(events):
            self._hints.add(self.send(Prefetch(RunKey(exp, int(run), detector, access_mode),
                                               mode, tuple(int(e) for e in events))))

    def view(self, exp: str, run: int, detector: str, event: int, mode: str = "calib",
             access_mode: str = "idx", fields: Fields = None) -> Frame:
        """One frame, zero-copy: use it in a `with` block or call `release()`."""
        return next(self.frames(self.submit(exp, run, detector, [event], mode, access_mode,
                                            fields)))

    def get_frame(self, exp: str, run: int, detector: str, event: int, mode: str = "calib",
                  access_mode: str = "idx", fields: Fields = None
                  ) -> Tuple[np.ndarray, Dict[str, Any]]:
        """One frame as a private array, with its descriptor (timestamp,
        calibrated, and `values` when fields were named)."""
        array, reply = self._copy(exp, run, detector, event, mode, access_mode, fields)
        return array, reply.to_header()

    def _copy(self, exp: str, run: int, detector: str, event: int, mode: str,
              access_mode: str, fields: Fields) -> Tuple[np.ndarray, FrameReply]:
        with self.view(exp, run, detector, event, mode, access_mode, fields) as frame:
            copy = frame.array if frame.private else np.array(frame.array), frame.reply
        self.flush_releases()    # an idle client should not sit on a frame
        return copy

    def get(self, exp: str, run: int, detector: str, event: int, mode: str = "calib",
            access_mode: str = "idx", fields: Fields = None) -> Any:
        """One frame as a private array. With `fields` (names of per-event
        values: other detectors' "ebeam.ebeamPhotonEnergy", "wave8.raw_all",
        "xpphsd.hsd.peaks", "timing.eventcodes", or the run's "epics.<PV>",
        "scan.<variable>", "step.index"; over the batch an integrating
        detector's event ends: "sum(hsd.calib)", "list(...)", "count(...)"),
        `(frame, {name: value})`, each value a numpy array (0-d for a scalar;
        strings and records as psana gives them, see `decode_value`)."""
        frame, reply = self._copy(exp, run, detector, event, mode, access_mode, fields)
        return (frame, decode_values(reply.desc.values)) if fields else frame

    def get_many(self, exp: str, run: int, detector: str, events: Sequence[int],
                 mode: str = "calib", out: Optional[np.ndarray] = None,
                 access_mode: str = "idx", fields: Fields = None,
                 skip_incomplete: bool = False) -> Any:
        """Frames of several events stacked into one array (or into `out`), each
        copied once straight from the server's memory, or received straight
        into its row when it comes inline; requests are pipelined. With
        `fields`, `(frames, {name: values stacked})`. With `skip_incomplete`,
        events lacking the detector or a field's detector are left out (as
        LCLStreamer's skip_incomplete_events) instead of raising `no_data`: the
        result then has fewer rows, `out` is filled from the start."""
        rows = iter(range(len(events)))     # frames come in order, skipped events leave none

        def land(reply: FrameReply) -> Optional[np.ndarray]:
            nonlocal out
            if out is None:
                out = np.empty((len(events),) + reply.desc.shape, reply.desc.dtype)
            return fitting(out[next(rows)], reply)
        rid = self.submit(exp, run, detector, events, mode, access_mode, fields,
                          skip_incomplete, land=land)
        values = []
        k = 0
        for k, frame in enumerate(self.frames(rid), 1):
            with frame:
                if out is None:
                    out = np.empty((len(events),) + frame.array.shape, frame.array.dtype)
                if not frame.landed:
                    np.copyto(out[k - 1], frame.array)
                values.append(frame.values)
        self.flush_releases()
        if out is not None and k < len(events):
            out = out[:k]
        return (out, stack_values(values)) if fields else out
