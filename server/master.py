"""The master: binds nothing itself, forks workers on a bound listener,
replaces the ones that die, and stops everything cleanly.

Signal handlers only enqueue; the loop drains the queue. Stopping asks
workers to stop, reaps them until a deadline, then SIGKILLs the rest, and
finally unlinks every segment named with this server's pid (of this user's
files only), so nothing survives a stop whatever state the workers were in.
Until then, and for `ABSORB_GRACE` after, the master accepts and closes
whatever connects: the btx family stops a server with one connect + `DONE`
per worker, and every connect of that loop must succeed even though the
first `DONE` stopped us. While it runs it holds the liveness lock
`psana-ipc cleanup` looks at. A worker that dies before it ever accepted
stops the server instead of being respawned forever; one whose loop stalls
longer than the request timeout (stuck in a source call, or frozen) logs
its traceback and is replaced.
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

from . import liveness
from .shared_state import SharedState
from .shm import sweep
from .wakeup import drain, wakeup_pipe

log = logging.getLogger(__name__)
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
DUMP_GRACE = 2.0       # a stalled worker's time to write its traceback before SIGKILL
ABSORB_GRACE = 1.0     # connections still accepted (and closed) after a stop


class Master:
    def __init__(self, listener: socket.socket, state: SharedState,
                 run_worker: Callable[[int], int], ready_info: Dict[str, object],
                 ready_file: Optional[str], request_timeout: float) -> None:
        self.listener = listener
        self.state = state
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
        self.exit_code = 0

    # -- signals --------------------------------------------------------------------
    def _enqueue(self, signum, frame) -> None:
        self.signals.append(signum)

    def _install_signals(self) -> int:
        """SIGHUP stops the server unless it was started with SIGHUP ignored
        (`nohup`): then master and workers keep ignoring it."""
        self._wake = wakeup_pipe()
        self._handled = [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD]
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
        booted = self.wait_ready()
        if booted:
            self.write_ready_file()
            log.info("serving on %s with %d workers", self.ready_info["address"], len(self.workers))
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
        """Remove what a dead worker held: its segments and its gauges."""
        sweep(self.pid, pid)
        self.state.reset_gauges(slot)

    def watchdog(self) -> None:
        """Replace a worker whose loop has not gone round for the request timeout:
        SIGABRT (with SIGCONT, for a SIGSTOPped one) makes its faulthandler log
        where it hung and ends it; SIGKILL follows if it is still there."""
        now = time.monotonic()
        for slot in self.state.stalled_workers(self.request_timeout):
            for pid, s in self.workers.items():
                if s != slot or pid in self.condemned:
                    continue
                why = ("spent over %.0fs on one request" if self.state.in_source_call(slot)
                       else "made no progress for %.0fs (frozen?)")
                log.error("worker %d " + why + ": logging its traceback and replacing it",
                          pid, self.request_timeout)
                _no_core_dump(pid)
                _kill(pid, signal.SIGABRT)
                _kill(pid, signal.SIGCONT)
                self.condemned[pid] = now + DUMP_GRACE
        for pid, deadline in list(self.condemned.items()):
            if pid not in self.workers:
                del self.condemned[pid]
            elif now >= deadline:
                _kill(pid, signal.SIGKILL)

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
        liveness.release(self.lock, self.pid)
        if self.ready_file:
            _remove(self.ready_file)
        grace_end = time.monotonic() + ABSORB_GRACE
        while time.monotonic() < grace_end:
            self.absorb(grace_end - time.monotonic())
        self.listener.close()
        log.info("stopped")

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
        """Atomically, so a launcher polling for it never reads half a file."""
        if not self.ready_file:
            return
        info = dict(self.ready_info, workers=sorted(self.workers))
        tmp = f"{self.ready_file}.{self.pid}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.ready_file)


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
