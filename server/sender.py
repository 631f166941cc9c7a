"""The worker's sender: a thread that keeps sending what connections have
queued while the worker's loop does a unit of work.

The loop sends between units of work, as much as each socket takes at
once. A frame sent inline is several socket buffers' worth (8.65 MB for an
epix10k2M calib frame), and a unit of work may take tens of milliseconds
(psana reading and calibrating an event, or waiting for a network file
system): sent only between units, such a frame would go out a buffer at a
time, once per unit, far below what the network carries. Meanwhile, the
sender sends instead, waiting for each socket to take more; the copy into
the socket runs without the interpreter's lock, so it overlaps a source
that waits and mostly overlaps one that computes.

It only sends bytes (`Channel.push`); everything else, including the
callbacks of what it sent, stays with the loop, which has the connections
to itself again once `meanwhile` returns.
"""
import os
import select
import signal
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, List

from .channel import Channel

WAIT_MS = 1000        # a poll's longest wait; the loop wakes it when its unit is done


class Sender:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._channels: List[Channel] = []
        self._busy = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        threading.Thread(target=self._run, name="sender", daemon=True).start()

    @contextmanager
    def meanwhile(self, channels: Iterable[Channel]) -> Iterator[None]:
        """Send what these connections have queued until the block ends."""
        with self._cond:
            self._channels = [c for c in channels if c.out and not c.closed]
            if self._channels:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                if self._channels or self._busy:
                    self._channels = []
                    self._wake()
                    while self._busy:
                        self._cond.wait()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:       # a wake-up is pending already
            pass

    def _run(self) -> None:
        # SIGABRT, the master asking a frozen worker where it hung, is the loop's
        # to take: faulthandler dumping the loop's thread from this one while the
        # loop runs on (a SIGSTOPped worker is continued with it) can crash.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT})
        while True:
            with self._cond:
                while not self._channels:
                    self._cond.wait()
                channels, self._busy = self._channels, True
            try:
                self._send(channels)
            finally:
                with self._cond:
                    if self._channels is channels:    # all sent: wait for the next unit's
                        self._channels = []
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, channels: List[Channel]) -> None:
        """Push each connection's queue until it is empty or the loop wants
        the connections back."""
        left = channels
        while left and self._channels is channels:
            left = [c for c in left if c.push()]
            if not left:
                return
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for channel in left:
                poller.register(channel.fd, select.POLLOUT)
            for fd, _ in poller.poll(WAIT_MS):
                if fd == self._wake_r:
                    os.read(self._wake_r, 64)
