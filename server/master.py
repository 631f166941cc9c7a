"""The master: binds nothing itself, forks workers on a bound listener,
replaces the ones that die, and stops everything cleanly.

Signal handlers only enqueue; the loop drains the queue. Stopping asks
workers to stop, reaps them until a deadline, then SIGKILLs the rest, and
finally unlinks every segment named with this server's pid, so nothing
survives a stop whatever state the workers were in. Until then, and for
`ABSORB_GRACE` after, the master accepts and closes whatever connects: the
btx family stops a server with one connect + `DONE` per worker, and every
connect of that loop must succeed even though the first `DONE` stopped us.
A worker that dies before it ever accepted stops the server instead of
being respawned forever; one that stays inside a source call longer than
the request timeout is killed and replaced.
"""
import json
import logging
import os
import select
import signal
import socket
import time
from typing import Callable, Dict, List, Optional

from psana_ipc.server.shm import our_segments, unlink

from .shared_state import COL, SharedState
from .wakeup import drain, wakeup_pipe

log = logging.getLogger(__name__)
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
ABSORB_GRACE = 1.0


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
        self.stopping = False
        self.exit_code = 0

    # -- signals --------------------------------------------------------------------
    def _enqueue(self, signum, frame) -> None:
        self.signals.append(signum)

    def _install_signals(self) -> int:
        self._wake = wakeup_pipe()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._enqueue)
        return self._wake[0]

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> int:
        wake_r = self._install_signals()
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
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
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
            booted = self.state.row(slot)[COL["ready"]] > 0
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
        for name in our_segments(self.pid, pid):
            unlink(name)
        self.state.reset_gauges(slot)

    def watchdog(self) -> None:
        for slot in self.state.busy_workers(self.request_timeout):
            for pid, s in self.workers.items():
                if s == slot:
                    log.error("worker %d spent over %.0fs on one request: killing it",
                              pid, self.request_timeout)
                    os.kill(pid, signal.SIGKILL)

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
        for name in our_segments(self.pid):
            unlink(name)
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


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
