"""A pre-forked worker: one event loop over the shared listening socket and
every connection it accepted.

Each pass reads what arrived, then does one unit of work (one frame) for
the oldest request of any connection: first come, first served, with the
sockets checked between frames. A worker accepts only while no other ready
worker has fewer connections (or once a connection has waited
`ACCEPT_GRACE`), which spreads a client's parallel connections over the
workers.

A frame's memory is reserved before it is read (`Channel.reserve`). When
the budget has no room, this loop is the one place that waits: it frees
the orphaned memory nobody holds any more and looks again every
RETRY_EVERY without touching the source, until MEMORY_WAIT has passed and
the frame is refused.

With a frame cache, a loop with no request waiting reads ahead: one frame a
client said comes next (a `prefetch`) goes into the cache per pass, so a
request that arrives meanwhile waits at most for that one frame. Once it
has had nothing at all to do for WARM_AFTER, it takes a few more MB of the
pages the cache may fill (frame_memory.WARM_BYTES), so entries are written
into pages that exist instead of fresh ones; never while clients keep it
busy, where taking pages would only compete with their frames. It also hands the pools to local
clients at the door (door.py) and, once a second, frees orphaned memory
nobody holds any more.

While it does a unit of work (or reads ahead), its sender thread keeps
sending what the connections have queued (sender.py): frames sent inline go
out at the network's pace, not a socket buffer per unit of work.

Set-up that is per process (signal handlers, the wakeup pipe, the sender
thread) happens here, after the fork, never inherited from the master.
"""
import errno
import faulthandler
import functools
import logging
import os
import selectors
import signal
import socket
import sys
import time
from typing import Callable, Dict, List, Optional

from psana_ipc.protocol.legacy import is_v1

from . import liveness
from .door import answer as answer_at_door
from .channel import Channel
from .context import WorkerContext
from .legacy_connection import LegacyConnection
from .pool_index import Grant
from .sender import Sender
from .shared_state import SharedState
from .v1_connection import V1Connection
from .wakeup import drain, wakeup_pipe

log = logging.getLogger(__name__)
ACCEPT_GRACE = 0.05
ACCEPT_PAUSE = 1.0
PARENT_CHECK = 1.0
MEMORY_WAIT = 3.0       # how long a frame waits for budget before `no_memory` is sent
RETRY_EVERY = 0.1       # how often a waiting frame looks again (no source call meanwhile)
FILL_POLL = 0.002       # how often a frame another worker is caching looks again
MAKE_ROOM = 8           # connections closed at a time when accept runs out of descriptors
SWEEP_EVERY = 1.0       # how often an idle worker frees orphaned memory nobody holds
WARM_AFTER = 0.5        # idle this long, a worker takes the frame cache's pages ahead


class Worker:
    def __init__(self, listener: socket.socket, door: socket.socket, state: SharedState,
                 slot: int, ctx: WorkerContext, master_pid: int) -> None:
        self.listener = listener
        self.door = door
        self.state = state
        self.slot = slot
        self.ctx = ctx
        self.master_pid = master_pid
        self.counters = ctx.counters
        self.conns: Dict[int, Channel] = {}
        self.unsorted: Dict[int, socket.socket] = {}   # accepted, dialect not known yet
        self.accepted_at: Dict[int, float] = {}
        self.stopping = False
        self.orphaned = False
        self.sel = selectors.DefaultSelector()
        self.pending_since: Optional[float] = None
        self.accept_paused_until: Optional[float] = None
        self.swept = 0.0
        self.memory_wait: Dict[Channel, float] = {}     # waiting since
        self.wake_at: Dict[Channel, float] = {}         # looks again then
        self.deadlines: Dict[Channel, float] = {}       # from each connection's tick
        self.heartbeat = min(PARENT_CHECK, ctx.request_timeout / 5)
        self.warming = True         # the frame cache's pages are not all taken yet
        self.worked_at = 0.0        # when the last unit of work was done
        self.sender: Optional[Sender] = None

    def run(self) -> int:
        wake_r, _ = wakeup_pipe()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        faulthandler.enable(sys.stderr, all_threads=True)   # SIGABRT from the master: a traceback
        self.sender = Sender()
        self.ctx.memory.start(self.counters.progress)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.door, selectors.EVENT_READ, "door")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.counters.started(os.getpid())
        try:
            self._loop(wake_r)
        finally:
            self.counters.stopped()
            for conn in list(self.conns.values()):
                conn.close()
            for sock in self.unsorted.values():
                sock.close()
            self.ctx.reader.sources.close()
            self.ctx.memory.close()
            if self.orphaned:
                liveness.abandon(self.master_pid)
        return 0

    def _on_stop_signal(self, signum, frame) -> None:
        self.stopping = True

    def _loop(self, wake_r: int) -> None:
        last_parent_check = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            self.counters.progress()
            busy = bool(self._ready(now)) or self._read_ahead_waiting() is not None \
                or self._warm_due(now)
            timeout = 0 if busy else self._next_deadline(now)
            for key, mask in self.sel.select(timeout):
                if key.data == "listen":
                    self._maybe_accept()
                elif key.data == "door":
                    answer_at_door(self.door, list(self.ctx.memory.pools.values()))
                elif key.data == "wake":
                    drain(wake_r)
                elif key.data == "new":
                    self._sort(key.fileobj)
                else:
                    self._io(key.data, mask)
            self._tick(now)         # as of before the sockets were looked at
            self._work_one()
            now = time.monotonic()
            if self.accept_paused_until is not None and now >= self.accept_paused_until:
                self.accept_paused_until = None
                self.sel.register(self.listener, selectors.EVENT_READ, "listen")
            if now - last_parent_check > PARENT_CHECK:
                last_parent_check = now
                if os.getppid() != self.master_pid:
                    log.warning("master is gone: worker exiting")
                    self.orphaned = True
                    return

    def _next_deadline(self, now: float) -> float:
        """Seconds the loop may sleep: until a pending accept, a memory retry, a
        connection's deadline, the warm-up's turn, or the next heartbeat (the master takes a loop
        that does not go round for --request-timeout for a frozen worker)."""
        waits = [self.heartbeat] + [at - now for at in self.wake_at.values()] \
            + [at - now for at in self.deadlines.values()]
        if self.warming:
            waits.append(self.worked_at + WARM_AFTER - now)
        if self.pending_since is not None:
            waits.append(ACCEPT_GRACE / 5)
        return max(0.0, min(waits))

    # -- connections --------------------------------------------------------------------
    def _maybe_accept(self) -> None:
        now = time.monotonic()
        if not self.state.least_loaded(self.slot):
            if self.pending_since is None:
                self.pending_since = now
            if now - self.pending_since < ACCEPT_GRACE:
                return
        self.pending_since = None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE) and self._make_room():
                return            # the listener is still readable: the next pass accepts
            log.warning("accept failed (%s): not accepting for %.0fs", e, ACCEPT_PAUSE)
            self.sel.unregister(self.listener)
            self.accept_paused_until = now + ACCEPT_PAUSE
            return
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.unsorted[sock.fileno()] = sock
        self.accepted_at[sock.fileno()] = now
        self.counters.connection(1)
        self.sel.register(sock, selectors.EVENT_READ, "new")

    def _make_room(self) -> int:
        """Out of descriptors: close the oldest connections without a complete
        request, or idle holding nothing (MAKE_ROOM at most). Returns how many."""
        doors = [(at, fd) for fd, at in self.accepted_at.items()]
        doors += [(c.expendable_since(), c) for c in self.conns.values()
                  if c.expendable_since() is not None]
        doors.sort(key=lambda d: d[0])
        for _, door in doors[:MAKE_ROOM]:
            if isinstance(door, int):
                self._close_unsorted(door)
            else:
                door.close()
                self._update(door)
        closed = min(len(doors), MAKE_ROOM)
        if closed:
            log.warning("out of file descriptors: closed the %d oldest connections without "
                        "a request", closed)
        return closed

    def _sort(self, sock: socket.socket) -> None:
        """Tell the dialect from the first byte, without consuming it."""
        if sock.fileno() < 0:         # closed earlier in this pass to make room
            return
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        fd = sock.fileno()
        self.sel.unregister(sock)
        del self.unsorted[fd], self.accepted_at[fd]
        if not first:
            sock.close()
            self.counters.connection(-1)
            return
        cls = V1Connection if is_v1(first[0]) else LegacyConnection
        conn = cls(sock, self.ctx)
        self.conns[fd] = conn
        self.sel.register(fd, selectors.EVENT_READ, conn)

    def _step(self, conn: Channel, step: Callable[[], object]) -> None:
        """Run one step of one connection. An unexpected error closes that
        connection only: the worker's other clients keep being served."""
        try:
            step()
        except Exception:
            log.exception("closing a connection after an unexpected error")
            conn.close()
        self._update(conn)

    def _io(self, conn: Channel, mask: int) -> None:
        if conn.closed:               # closed earlier in this pass to make room
            return

        def step() -> None:
            if mask & selectors.EVENT_READ:
                conn.on_readable()
            if mask & selectors.EVENT_WRITE and not conn.closed:
                conn.on_writable()
        self._step(conn, step)

    def _ready(self, now: float) -> List[Channel]:
        return [c for c in self.conns.values()
                if c.has_work() and now >= self.wake_at.get(c, now)]

    def _work_one(self) -> None:
        """One unit of work: the oldest request first, whichever connection it
        came on. A batch asked for earlier is finished earlier, so a client
        (a DataLoader worker) can use it while the next one is produced."""
        now = time.monotonic()
        ready = self._ready(now)
        if ready:
            conn = min(ready, key=lambda c: c.next_arrival())
            self.worked_at = now
            self._sending_meanwhile(conn, functools.partial(self._serve, conn, now))
            return
        conn = self._read_ahead_waiting()
        if conn is not None:
            self.worked_at = now
            self._sending_meanwhile(conn, conn.read_ahead)
        elif any(c.has_work() for c in self.conns.values()):
            self.worked_at = now
        elif now - self.swept >= SWEEP_EVERY:
            self.swept = now
            self.ctx.memory.sweep()
        elif self._warm_due(now):
            self.warming = self.ctx.memory.warm()

    def _warm_due(self, now: float) -> bool:
        return self.warming and now - self.worked_at >= WARM_AFTER

    def _sending_meanwhile(self, conn: Channel, step: Callable[[], object]) -> None:
        """A step of one connection while the sender sends what all have
        queued; then the loop runs the callbacks of what it sent."""
        queued = [c for c in self.conns.values() if c.out]
        if not queued:
            self._step(conn, step)
            return
        with self.sender.meanwhile(queued):
            self._step(conn, step)
        for channel in queued:
            if channel.sent_meanwhile and not channel.closed:
                self._step(channel, channel.flush)

    def _read_ahead_waiting(self) -> Optional[Channel]:
        """A connection with frames to read ahead, when no request waits at all
        (not even for memory, or for a frame another worker is caching)."""
        if any(c.has_work() for c in self.conns.values()):
            return None
        return next((c for c in self.conns.values() if c.wants_read_ahead()), None)

    def _serve(self, conn: Channel, now: float) -> None:
        """Reserve the frame's memory, then do the work; the only place that
        waits for memory."""
        grant = conn.reserve()
        if grant is Grant.PENDING:
            self.wake_at[conn] = now + FILL_POLL
            return
        if grant is Grant.WAIT:
            since = self.memory_wait.setdefault(conn, now)
            if now - since < MEMORY_WAIT:
                self.ctx.memory.sweep()
                self.wake_at[conn] = now + RETRY_EVERY
                return
        self.memory_wait.pop(conn, None)
        self.wake_at.pop(conn, None)
        if grant is Grant.GRANTED:
            conn.work()
        else:
            conn.refuse(grant)

    def _tick(self, now: float) -> None:
        """Close what missed its deadline, judged at `now`: when the loop last
        looked at the sockets. Whatever arrived before then has been read,
        even if a long unit of work (psana opening a run for an `info`, setting
        calib up) ran since: a hello sent in time is never judged late."""
        for conn in list(self.conns.values()):
            self._step(conn, functools.partial(self._tick_one, conn, now))
        for fd, at in list(self.accepted_at.items()):
            if now - at > self.ctx.first_request_within:
                self._close_unsorted(fd)

    def _tick_one(self, conn: Channel, now: float) -> None:
        deadline = conn.tick(now)
        if deadline is None:
            self.deadlines.pop(conn, None)
        else:
            self.deadlines[conn] = deadline

    def _close_unsorted(self, fd: int) -> None:
        sock = self.unsorted.pop(fd)
        del self.accepted_at[fd]
        self.sel.unregister(sock)
        sock.close()
        self.counters.connection(-1)

    def _update(self, conn: Channel) -> None:
        """Keep the selector in line with the connection; forget it once closed.
        Runs right after every call that may close, before any new accept can
        reuse the descriptor number."""
        if conn.closed:
            for waits in (self.memory_wait, self.wake_at, self.deadlines):
                waits.pop(conn, None)
            if self.conns.pop(conn.fd, None) is not None:
                self.sel.unregister(conn.fd)
                self.counters.connection(-1)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if self.sel.get_key(conn.fd).events != events:
            self.sel.modify(conn.fd, events, conn)
