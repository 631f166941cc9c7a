"""`Client`: one persistent v1 connection to an iserver.

It connects on first use and again after a fork (each DataLoader worker gets
its own connection), and turns error replies into `ServerError`. It sends
the protocol's request types (`protocol.messages`) and reads every reply as
the protocol's reply types (`protocol.replies`), never a header by hand.
Frames arrive in the server's pool (same host; client/pool.py maps it once
per process) or inline; `get`/`get_many` copy each frame in the pool once
and release it (releases travel in batches, all sent before the call
returns); `view` and `frames` hand out the pool's memory itself
(zero-copy), held until released. An inline frame is received straight
into where it is kept: the array `get` returns, the row of `get_many`'s
result, or whatever memory the request's `land` names (a batch's row), so
its bytes are copied once, by the kernel, and never again here.

Zero-copy lifetime rule: the array of a `Frame` from `view` or `frames` is
valid until `Frame.release()` (or the end of its `with` block); after that
the server reuses the memory for another event. Copy what you keep.
"""
import contextlib
import os
import select
import socket
import warnings
from collections import deque
from typing import (Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence,
                    Set, Tuple)

import numpy as np

from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.address import Address, format_address
from psana_ipc.protocol.errors import (BAD_ARENA, OUT_OF_RANGE, UNKNOWN_DETECTOR, ProtocolError,
                                       ServerError)
from psana_ipc.protocol.messages import (CodeFilter, FieldRef, FreeArenas, Get, Hello, Info, Into,
                                         MakeArena, Ping, Prefetch, Release, Request, RunKey,
                                         Shutdown, Stats, frame_nbytes)
from psana_ipc.protocol.replies import (NO_REPLY, ArenaMade, ErrorReply, FrameReply, InPool,
                                        Reply, Welcome, parse_reply)

from . import pool
from .frame import Frame
from .discovery import find_token, resolve_address
from .follow import Follower
from .field_values import decode_values, stack_values
from .pool import Pools
from .wire import ConnectionClosed, Receiver, send_message, socket_family

RELEASE_BATCH = 16
Fields = Optional[Sequence[str]]
Codes = Optional[Dict[str, Sequence[int]]]     # {"with": [codes], "without": [codes]}
STEP = "step"          # the run-level info entry of a run's steps
# Where an inline frame goes, asked once its reply is read and before its bytes are: an
# array of exactly the frame's size (a batch's row), or None for an array of its own.
Land = Callable[[FrameReply], Optional[np.ndarray]]


class Payload(NamedTuple):
    """The bytes of a frame that came inline, as received."""
    array: np.ndarray
    landed: bool          # in the memory the request's `land` gave


WithPayload = Tuple[Reply, Optional[Payload]]  # a reply, and the frame that came inline


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


def _fresh(reply: Reply, size: int) -> np.ndarray:
    """New memory for a payload: an array of the frame's shape and dtype (as
    `get` hands it out), or bytes when the reply describes another size."""
    if isinstance(reply, FrameReply):
        dtype = np.dtype(reply.desc.dtype)
        if frame_nbytes(reply.desc.shape, dtype.itemsize) == size:
            return np.empty(reply.desc.shape, dtype)
    return np.empty(size, np.uint8)


class Client:
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

    def __init__(self, address: Any = None, *, transport: str = "auto",
                 token: Optional[str] = None, window: int = 0, writable: bool = False,
                 timeout: Optional[float] = 300.0, connect_timeout: float = 10.0,
                 group: Optional[str] = None, leader: Optional["Client"] = None) -> None:
        if transport not in ("auto", "shm", "inline"):
            raise ValueError("transport must be 'auto', 'shm' or 'inline'")
        self.address: Address = resolve_address(address)
        self.transport = transport
        self.token = token
        self.window = window
        self.writable = writable
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.group = group
        self._issued: Optional[str] = None     # the group id a server gave this client
        self._leader = leader
        self._pid = os.getpid()
        self._sock: Optional[socket.socket] = None
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        """Forget the connection; frames handed out before now no longer release."""
        self.generation += 1
        self._sock = None
        self._receiver: Optional[Receiver] = None
        self.pools: Optional[Pools] = None      # the server's memory, shared by the process
        self._hints: Set[int] = set()    # prefetch requests whose replies nobody waits for
        self._next_id = 0
        self._waiting: Dict[int, Request] = {}     # requests whose last reply has not come
        self._land: Dict[int, Land] = {}     # where the inline frames of a get go, by its id
        self._pending: Dict[int, Deque[WithPayload]] = {}
        self._to_release: List[int] = []
        self._to_free: List[int] = []      # batch buffers to give back with the next message
        self._held: Set[int] = set()     # frames handed out and not released
        self.server: Optional[Welcome] = None     # the hello reply, once connected

    # -- connection ---------------------------------------------------------------------
    def _ensure(self) -> socket.socket:
        if self._pid != os.getpid():   # forked: the parent's connection is not ours to use
            if self._sock is not None:
                self._sock.close()
            self._pid = os.getpid()
            self._reset()
        if self._sock is None:
            self._connect()
        return self._sock

    def _connect(self) -> None:
        sock = socket.socket(socket_family(self.address), socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.address)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot connect to iserver at "
                                  f"{format_address(self.address)}: {e}") from e
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        self._sock = sock
        self._receiver = Receiver(sock)
        transport = "inline" if self.transport == "inline" else "shm"
        try:
            hello = Hello(PROTOCOL_VERSION, find_token(self.token, self.address),
                          socket.gethostname(), transport, self.window, self.group)
            self.server = self._result(self._send_request(hello))
            self.group = self._issued = self.server.group
        except ServerError as e:
            self.close()
            if e.code != BAD_ARENA or self.group is None:
                raise
            if self._leader is not None:
                self._follow_leader()
                return
            if self.group != self._issued:
                raise           # only a group a server issued before may be forgotten
            warnings.warn(f"the server no longer knows connection group {self.group} (it "
                          f"restarted?): this connection starts a new group")
            self.group = None
            self._connect()
            return
        except BaseException:
            self.close()
            raise
        if self.transport == "shm" and self.server.transport != "shm":
            self.close()
            raise ConnectionError("the server cannot share memory with this client "
                                  "(another host?); use transport='auto' or 'inline'")
        if self.server.transport == "shm":
            try:
                self.pools = pool.acquire(self.server.door, self.writable)
            except BaseException:
                self.close()
                raise

    def _follow_leader(self) -> None:
        """The server no longer knows the group: join the one it issues the
        leader (asked again first, so it reconnects into it), not a group of
        this connection's own."""
        stale = self.group
        self._leader.ping()
        if self._leader.group in (None, stale):
            raise ServerError(BAD_ARENA, f"the server no longer knows connection group "
                                         f"{stale}, and the group's first connection is "
                                         f"still in it")
        self.group = self._leader.group
        self._connect()

    def close(self) -> None:
        """Release what this connection holds and close it (the next request
        connects again)."""
        if self._sock is not None and self._pid == os.getpid():
            try:
                self._send_releases()
            except OSError:
                pass
            self._sock.close()
        if self.pools is not None and self._pid == os.getpid():
            pool.release(self.pools.door, self.writable)
        self._reset()

    def __del__(self) -> None:
        """Close the socket of a client dropped without `close()`, saying nothing
        to the server (no I/O from a finalizer): the server frees what the
        connection held when it sees it closed."""
        sock = self.__dict__.get("_sock")
        if sock is not None:
            sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle settings only (DataLoader workers may be spawned, not forked)."""
        return {k: getattr(self, k) for k in ("address", "transport", "token", "window",
                                              "writable", "timeout", "connect_timeout")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.group = self._issued = self._leader = None
        self._pid = os.getpid()
        self.generation = 0
        self._reset()

    # -- messages -----------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send_request(self, request: Request) -> int:
        rid = self._new_id()
        send_message(self._sock, request.to_header(rid))
        if not isinstance(request, NO_REPLY):
            self._waiting[rid] = request
        return rid

    def _refused(self, error: ProtocolError) -> int:
        """A request the server would refuse, answered here as it would answer
        it (nothing is sent): its id, whose reply raises ServerError."""
        rid = self._new_id()
        self._pending[rid] = deque([(ErrorReply(rid, error.code, error.message), None)])
        return rid

    def _closed_while_idle(self) -> bool:
        """The server closes a connection that stays idle holding nothing past its
        --idle-timeout: an end of stream with no reply pending and no frame
        held, which the next request simply reconnects from."""
        if self._sock is None or self._pending or self._held or self._receiver.buffered():
            return False
        try:
            poller = select.poll()      # not select(): descriptors past 1024 are common
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(0):
                return False
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _lost(self) -> str:
        return (f"lost the connection to iserver at {format_address(self.address)}: "
                f"the server stopped or restarted")

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        """A timeout or a dropped connection loses the stream: close it, so the next
        request connects afresh; a drop says in one line what happened."""
        try:
            yield
        except (ConnectionResetError, BrokenPipeError, ConnectionClosed) as e:
            self.close()
            raise ConnectionClosed(self._lost()) from e
        except OSError:
            self.close()
            raise

    def forget_if_closed(self) -> None:
        """Forget a connection the server closed while it was idle (its idle
        timeout, a restart between epochs): what was tied to it (batch buffers)
        is then known gone, and the next request connects again. One closed
        under requests still waiting for replies is left for them to report."""
        if self._sock is not None and self._pid == os.getpid() and not self._waiting \
                and self._closed_while_idle():
            self.close()

    def send(self, request: Request) -> int:
        """Send a request without waiting; returns its id."""
        self._ensure()
        if self._closed_while_idle():
            self.close()
            try:
                self._ensure()
            except ConnectionError as e:
                raise ConnectionClosed(f"{self._lost()} ({e})") from e
        with self._stream():
            self._send_releases()
            return self._send_request(request)

    def reply(self, rid: int) -> WithPayload:
        """The next reply to request `rid`, reading (and keeping) others on the way."""
        queue = self._pending.setdefault(rid, deque())
        while not queue:
            if self._sock is None:       # closed since the request was sent
                self._pending.pop(rid, None)
                raise ConnectionClosed(self._lost())
            with self._stream():
                self._send_releases()
                head = self._receiver.head()
                try:
                    reply = parse_reply(head.header, self._waiting)
                except ProtocolError:
                    self.close()       # its payload, if any, is still in the stream
                    raise
                payload = self._receive(head.size, reply) if head.size else None
            if reply.last:
                self._waiting.pop(reply.rid, None)
                self._land.pop(reply.rid, None)
            if reply.rid in self._hints:
                self._hints.discard(reply.rid)
                continue
            self._pending.setdefault(reply.rid, deque()).append((reply, payload))
            if reply.rid == -1 and isinstance(reply, ErrorReply):
                raise ServerError.from_reply(reply)
        item = queue.popleft()
        if not queue and item[0].last:
            del self._pending[rid]
        return item

    def _receive(self, size: int, reply: Reply) -> Payload:
        """A payload, received where the request's `land` says (a row of its
        batch), else into new memory."""
        landing = self._landing(reply, size)
        array = landing if landing is not None else _fresh(reply, size)
        self._receiver.payload(memoryview(array.reshape(-1)).cast("B"))
        return Payload(array, landing is not None)

    def _landing(self, reply: Reply, size: int) -> Optional[np.ndarray]:
        """The memory the request's `land` gives a frame, if it fits exactly."""
        land = self._land.get(reply.rid) if isinstance(reply, FrameReply) else None
        array = land(reply) if land is not None else None
        if array is None or array.nbytes != size or not array.flags.c_contiguous \
                or not array.flags.writeable:
            return None
        return array

    def _result(self, rid: int) -> Any:
        reply, _ = self.reply(rid)
        if isinstance(reply, ErrorReply):
            raise ServerError.from_reply(reply)
        return reply

    def call(self, request: Request) -> Reply:
        """Send a request and return its reply; an error reply raises ServerError."""
        return self._result(self.send(request))

    # -- releasing frames -----------------------------------------------------------------
    def release(self, handle: int) -> None:
        """Tell the server a frame was let go (sent in batches, and always before
        waiting for a reply)."""
        self._held.discard(handle)
        self._to_release.append(handle)
        if len(self._to_release) >= RELEASE_BATCH:
            self.flush_releases()

    def flush_releases(self) -> None:
        """Send the releases not sent yet (they go in batches); a connection
        lost meanwhile raises ConnectionClosed."""
        if self._to_release or self._to_free:
            with self._stream():
                self._send_releases()

    def _send_releases(self) -> None:
        if self._to_release and self._sock is not None:
            handles = []
            while self._to_release:
                handles.append(self._to_release.pop())
            self._send_request(Release(tuple(handles)))
        if self._to_free and self._sock is not None:
            tickets = []
            while self._to_free:
                tickets.append(self._to_free.pop())
            self._send_request(FreeArenas(tuple(tickets)))

    def answered(self, rid: int) -> bool:
        """Whether the next reply to `rid` is had without waiting for the
        server: one was read already (whole, or begun), none is to come, or the
        connection is gone (reading then raises)."""
        return bool(self._pending.get(rid)) or rid not in self._waiting or self._sock is None \
            or self._receiver.buffered()

    def fileno(self) -> int:
        """The connection's socket (-1 when not connected)."""
        return self._sock.fileno() if self._sock is not None else -1

    def connect(self) -> "Client":
        """Connect now rather than on first use."""
        self._ensure()
        return self

    @property
    def worker(self) -> int:
        """The pid of the server worker this connection is served by."""
        return self.connect().server.worker

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
        return self.call(MakeArena(int(nbytes), wait))

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
