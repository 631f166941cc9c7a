"""A pre-forked worker: one event loop over the shared listening socket and
every connection it accepted.

Each pass reads what arrived, then does one unit of work (one frame) for
the oldest request of any connection: first come, first served, with the
sockets checked between frames. A worker accepts only while no other ready
worker has fewer connections (or once a connection has waited
`ACCEPT_GRACE`), which spreads a client's parallel connections over the
workers.

Set-up that is per process (signal handlers, the wakeup pipe) happens here,
after the fork, never inherited from the master.
"""
import functools
import logging
import os
import selectors
import signal
import socket
import time
from typing import Callable, Dict, Optional

from psana_ipc.protocol.legacy import is_v1

from .channel import Channel
from .context import WorkerContext
from .legacy_connection import LegacyConnection
from .shared_state import COL, SharedState
from .v1_connection import V1Connection
from .wakeup import drain, wakeup_pipe

log = logging.getLogger(__name__)
ACCEPT_GRACE = 0.05
ACCEPT_PAUSE = 1.0
PARENT_CHECK = 1.0


class Worker:
    def __init__(self, listener: socket.socket, state: SharedState, slot: int,
                 ctx: WorkerContext, master_pid: int) -> None:
        self.listener = listener
        self.state = state
        self.slot = slot
        self.ctx = ctx
        self.master_pid = master_pid
        self.row = state.row(slot)
        self.conns: Dict[int, Channel] = {}
        self.unsorted: Dict[int, socket.socket] = {}   # accepted, dialect not known yet
        self.accepted_at: Dict[int, float] = {}
        self.stopping = False
        self.sel = selectors.DefaultSelector()
        self.pending_since: Optional[float] = None
        self.accept_paused_until: Optional[float] = None
        self.trims_seen = 0

    def run(self) -> int:
        wake_r, _ = wakeup_pipe()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        self.ctx.allocator.on_pressure = self._trim_idle
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.row[COL["pid"]] = os.getpid()
        self.row[COL["ready"]] = 1
        try:
            self._loop(wake_r)
        finally:
            self.row[COL["ready"]] = 0
            for conn in list(self.conns.values()):
                conn.close()
            for sock in self.unsorted.values():
                sock.close()
            self.ctx.reader.cache.close()
        return 0

    def _on_stop_signal(self, signum, frame) -> None:
        self.stopping = True

    def _loop(self, wake_r: int) -> None:
        last_parent_check = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            busy = any(c.due(now) and c.has_work() for c in self.conns.values())
            timeout = 0 if busy else self._next_deadline(now)
            for key, mask in self.sel.select(timeout):
                if key.data == "listen":
                    self._maybe_accept()
                elif key.data == "wake":
                    drain(wake_r)
                elif key.data == "new":
                    self._sort(key.fileobj)
                else:
                    self._io(key.data, mask)
            self._work_one()
            now = time.monotonic()
            self._tick(now)
            if self.accept_paused_until is not None and now >= self.accept_paused_until:
                self.accept_paused_until = None
                self.sel.register(self.listener, selectors.EVENT_READ, "listen")
            if now - last_parent_check > PARENT_CHECK:
                last_parent_check = now
                if os.getppid() != self.master_pid:
                    log.warning("master is gone: worker exiting")
                    return

    def _next_deadline(self, now: float) -> float:
        """Seconds the loop may sleep: until a pending accept, a memory retry, or
        the next look at the parent."""
        waits = [PARENT_CHECK] + [c.wake_at - now for c in self.conns.values()
                                  if c.wake_at is not None]
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
        except OSError as e:   # e.g. out of file descriptors: pause instead of spinning
            log.warning("accept failed (%s): not accepting for %.0fs", e, ACCEPT_PAUSE)
            self.sel.unregister(self.listener)
            self.accept_paused_until = now + ACCEPT_PAUSE
            return
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.unsorted[sock.fileno()] = sock
        self.accepted_at[sock.fileno()] = now
        self.row[COL["connections"]] += 1
        self.sel.register(sock, selectors.EVENT_READ, "new")

    def _sort(self, sock: socket.socket) -> None:
        """Tell the dialect from the first byte, without consuming it."""
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
            self.row[COL["connections"]] -= 1
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
        def step() -> None:
            if mask & selectors.EVENT_READ:
                conn.on_readable()
            if mask & selectors.EVENT_WRITE and not conn.closed:
                conn.on_writable()
        self._step(conn, step)

    def _work_one(self) -> None:
        """One unit of work: the oldest request first, whichever connection it
        came on. A batch asked for earlier is finished earlier, so a client
        (a DataLoader worker) can use it while the next one is produced."""
        if self.state.trim_requests() != self.trims_seen:   # a worker is short of budget
            self.trims_seen = self.state.trim_requests()
            self._trim_idle()
        now = time.monotonic()
        ready = [c for c in self.conns.values() if c.due(now) and c.has_work()]
        if ready:
            conn = min(ready, key=lambda c: c.next_arrival())
            self._step(conn, conn.work)

    def _tick(self, now: float) -> None:
        for conn in list(self.conns.values()):
            self._step(conn, functools.partial(conn.tick, now))
        for fd, at in list(self.accepted_at.items()):
            if now - at > self.ctx.idle_timeout:
                sock = self.unsorted.pop(fd)
                del self.accepted_at[fd]
                self.sel.unregister(sock)
                sock.close()
                self.row[COL["connections"]] -= 1

    def _update(self, conn: Channel) -> None:
        """Keep the selector in line with the connection; forget it once closed.
        Runs right after every call that may close, before any new accept can
        reuse the descriptor number."""
        if conn.closed:
            if self.conns.pop(conn.fd, None) is not None:
                self.sel.unregister(conn.fd)
                self.row[COL["connections"]] -= 1
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if self.sel.get_key(conn.fd).events != events:
            self.sel.modify(conn.fd, events, conn)

    def _trim_idle(self) -> int:
        return sum(c.pool.trim() for c in self.conns.values()
                   if isinstance(c, V1Connection) and c.pool is not None)
