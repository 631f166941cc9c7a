"""The master: binds nothing itself, forks workers on a bound listener,
replaces the ones that die, and stops everything cleanly.

Signal handlers only enqueue; the loop drains the queue. Stopping asks
workers to stop, reaps them until a deadline, then SIGKILLs the rest, and
finally unlinks every segment named with this server's pid (of this user's
files only), so nothing survives a stop whatever state the workers were in.
Until then, and for `ABSORB_GRACE` after a stop a `DONE` asked for, the
master accepts and closes whatever connects: the btx family stops a server
with one connect + `DONE` per worker, and every connect of that loop must
succeed even though the first `DONE` stopped us. While it runs it holds the liveness lock
`psana-ipc cleanup` looks at. A worker that dies before it ever accepted
stops the server instead of being respawned forever; one whose loop stalls
longer than the request timeout (stuck in a source call, or frozen), or
that holds the pool index's lock longer than pool_index.LOCK_LIMIT (frozen
while holding it), logs its traceback and is replaced. The master never
takes that lock: it tells the workers that one died by bumping the slot's
generation (a single write), and they reclaim what it left. At stop it
gives back every page of the pools that no client still holds.
"""
import json
import logging
import os
import resource
import select
import signal
import socket
import time
from typing import Callable, Dict, List, Optional

from psana_ipc.protocol.units import format_bytes

from . import liveness
from .pool_index import LOCK_LIMIT, Index
from .pool_pages import PoolFile
from .private_file import write_atomically
from .shared_state import SharedState
from .shm import sweep
from .wakeup import drain, wakeup_pipe

log = logging.getLogger(__name__)
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
DUMP_GRACE = 2.0       # a stalled worker's time to write its traceback before SIGKILL
# A worker asks the master to stop with these signals (a client's v1 shutdown, or a
# legacy DONE), so the log tells a requested stop from a SIGTERM, and only a DONE
# stop keeps absorbing the DONEs that follow it.
SHUTDOWN_SIGNAL = signal.SIGUSR1
DONE_SIGNAL = signal.SIGUSR2
ABSORB_GRACE = 1.0     # connections still accepted (and closed) after a DONE stop


class Master:
    def __init__(self, listener: socket.socket, state: SharedState, index: Index,
                 pools: List[PoolFile], run_worker: Callable[[int], int],
                 ready_info: Dict[str, object], ready_file: Optional[str],
                 request_timeout: float) -> None:
        self.listener = listener
        self.state = state
        self.index = index
        self.pools = pools
        self.run_worker = run_worker
        self.ready_info = ready_info
        self.ready_file = ready_file
        self.request_timeout = request_timeout
        self.pid = os.getpid()
        self.workers: Dict[int, int] = {}        # pid -> slot
        self.signals: List[int] = []
        self.condemned: Dict[int, float] = {}    # stalled worker pid -> SIGKILL then
        self.lock: Optional[int] = None           # the liveness lock, while running
        self.stopping = False
        self.grace = 0.0                          # ABSORB_GRACE once a DONE stopped us
        self.exit_code = 0

    # -- signals --------------------------------------------------------------------
    def _enqueue(self, signum, frame) -> None:
        self.signals.append(signum)

    def _install_signals(self) -> int:
        """SIGHUP stops the server unless it was started with SIGHUP ignored
        (`nohup`): then master and workers keep ignoring it."""
        self._wake = wakeup_pipe()
        self._handled = [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, SHUTDOWN_SIGNAL,
                         DONE_SIGNAL]
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            self._handled.append(signal.SIGHUP)
        for sig in self._handled:
            signal.signal(sig, self._enqueue)
        return self._wake[0]

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> int:
        wake_r = self._install_signals()
        self.lock = liveness.hold(self.pid)
        for slot in range(self.state.workers):
            self.spawn(slot)
        if self.wait_ready():
            self.announce()
        while not self.stopping:
            select.select([wake_r], [], [], 0.5)
            drain(wake_r)
            self.dispatch()
            self.watchdog()
        self.stop()
        return self.exit_code

    def dispatch(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                self.reap()
            elif signum == SHUTDOWN_SIGNAL:
                log.info("shutdown requested by a client: stopping")
                self.stopping = True
            elif signum == DONE_SIGNAL:
                log.info("DONE received from a client: stopping")
                self.stopping, self.grace = True, ABSORB_GRACE
            elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                log.info("%s received: stopping", signal.Signals(signum).name)
                self.stopping = True

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.state.all_ready():
            time.sleep(0.01)
            self.dispatch()
            if self.stopping:
                return False
            if time.monotonic() > deadline:
                log.error("workers did not start within %.0fs", BOOT_TIMEOUT)
                self.stopping, self.exit_code = True, 1
                return False
        return True

    # -- workers ------------------------------------------------------------------------
    def spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid:
            self.workers[pid] = slot
            return
        code = 1
        try:
            for sig in self._handled:
                signal.signal(sig, signal.SIG_DFL)
            for fd in self._wake:
                os.close(fd)
            code = self.run_worker(slot)
        except BaseException:
            log.exception("worker crashed")
        finally:
            logging.shutdown()
            os._exit(code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            booted = self.state.booted(slot)
            self.forget(slot, pid)
            if self.stopping:
                continue
            if not booted:
                log.error("worker %d failed to boot (status %d): stopping", pid, status)
                self.stopping, self.exit_code = True, 1
                continue
            log.warning("worker %d died (status %d): starting a new one", pid, status)
            self.spawn(slot)

    def forget(self, slot: int, pid: int) -> None:
        """Remove what a dead worker held: its segments and its gauges; its
        generation moves on, so the workers reclaim what it held in the pool."""
        sweep(self.pid, pid)
        self.state.reset_gauges(slot)
        self.index.generation[slot] += 1

    def watchdog(self) -> None:
        """Replace a worker whose loop has not gone round for the request timeout,
        or that holds the pool index's lock for longer than LOCK_LIMIT: SIGABRT
        (with SIGCONT, for a SIGSTOPped one) makes its faulthandler log where it
        hung and ends it; SIGKILL follows if it is still there."""
        now = time.monotonic()
        for slot in self.state.stalled_workers(self.request_timeout):
            why = ("spent over %.0fs on one request" % self.request_timeout
                   if self.state.in_source_call(slot)
                   else "made no progress for %.0fs (frozen?)" % self.request_timeout)
            self.condemn(slot, why, now)
        holder = self.index.lock.holder()
        slot = self.workers.get(holder) if holder is not None else None
        if slot is not None:
            since = int(self.index.since[slot])
            if since and time.monotonic_ns() - since > LOCK_LIMIT * 1e9:
                self.condemn(slot, "held the pool's lock for over %.0fs (frozen?)" % LOCK_LIMIT,
                             now)
        for pid, deadline in list(self.condemned.items()):
            if pid not in self.workers:
                del self.condemned[pid]
            elif now >= deadline:
                _kill(pid, signal.SIGKILL)

    def condemn(self, slot: int, why: str, now: float) -> None:
        for pid, s in self.workers.items():
            if s != slot or pid in self.condemned:
                continue
            log.error("worker %d %s: logging its traceback and replacing it", pid, why)
            _no_core_dump(pid)
            _kill(pid, signal.SIGABRT)
            _kill(pid, signal.SIGCONT)
            self.condemned[pid] = now + DUMP_GRACE

    # -- stopping -----------------------------------------------------------------------
    def stop(self) -> None:
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            self.reap()
            self.absorb(0.01)
        for pid in list(self.workers):
            log.warning("worker %d did not stop in time: killing it", pid)
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.forget(self.workers.pop(pid), pid)
        sweep(self.pid)
        for pool in self.pools:
            pool.give_back()
        liveness.release(self.lock, self.pid)
        if self.ready_file:
            _remove(self.ready_file)
        grace_end = time.monotonic() + self.grace
        while time.monotonic() < grace_end:
            self.absorb(grace_end - time.monotonic())
        self.listener.close()
        log.info("stopped")

    def announce(self) -> None:
        """Log the start-up line, then write the ready file (so the log says so
        by the time a launcher sees the file); stop if the file cannot be written."""
        log.info("serving %s on %s: %d workers, shared-memory budget %s",
                 self.ready_info["source"], self.ready_info["address"], len(self.workers),
                 format_bytes(self.ready_info["shm_budget"]))
        try:
            self.write_ready_file()
        except OSError as e:
            log.error("cannot write the ready file %s: %s: stopping", self.ready_file, e.strerror)
            self.stopping, self.exit_code = True, 1
            self.ready_file = None   # whatever is at that path is not ours to remove

    def absorb(self, timeout: float) -> None:
        """Accept and close the connections that arrive within `timeout`."""
        if not select.select([self.listener], [], [], max(0.0, timeout))[0]:
            return
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:     # none left (the listener is non-blocking), or no descriptors
                return
            with sock:
                sock.setblocking(False)
                try:
                    sock.recv(64)     # a DONE already sent is read, so closing resets nothing
                except OSError:
                    pass

    def write_ready_file(self) -> None:
        """Atomically, so a launcher polling for it never reads half a file, and
        never through a planted symlink (see private_file)."""
        if not self.ready_file:
            return
        write_atomically(self.ready_file, json.dumps(dict(self.ready_info,
                                                          workers=sorted(self.workers))))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _no_core_dump(pid: int) -> None:
    """SIGABRT is for the traceback: no core file of a worker's whole memory."""
    try:
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
    except OSError:
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
