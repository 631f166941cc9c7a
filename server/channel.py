"""A non-blocking connection as a worker's event loop sees it: bytes in,
a queue of bytes out, one unit of work (one frame) at a time, the memory
that work needs, and the connection's deadlines.

Both dialects subclass `Channel`; the loop only calls the methods here, so
one slow or silent client never blocks the others of the same worker. A
unit of work runs in two steps: `reserve` takes the frame's memory from the
budget without reading anything, then `work` reads the frame into it once.
When `reserve` finds no room, the worker (and only the worker) decides to
wait or to `refuse`.

What is queued to send goes out from the loop, and meanwhile, while the
loop does a unit of work, from the worker's sender thread (sender.py),
which only sends bytes: the callbacks of what it sent wait in
`sent_meanwhile` for the loop. `lock` keeps the two from using the queue
and the socket at once.
"""
import socket
import threading
import time
from collections import deque
from typing import Callable, Deque, Optional, Union

from .pool_index import Grant

RECV_SIZE = 65536
MAX_UNSENT = 4096       # chunks queued for a peer that does not read: then it is dropped
# Bytes to send, or a callback run once everything queued before it has been sent.
Chunk = Union[bytes, memoryview, Callable[[], None]]


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.out: Deque[Chunk] = deque()
        self.sent_meanwhile: Deque[Callable[[], None]] = deque()
        self.lock = threading.RLock()
        self.closed = False
        self.close_after_flush = False
        self.opened_at = self.last_activity = time.monotonic()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- what the loop calls ---------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.last_activity = time.monotonic()
        if not data:
            self.on_eof()
        elif not self.close_after_flush:   # a closing connection takes no more requests
            self.on_data(data)

    def on_writable(self) -> None:
        self.flush()

    def has_work(self) -> bool:
        return False

    def wants_read_ahead(self) -> bool:
        """Frames this connection said come next are waiting to be read ahead."""
        return False

    def read_ahead(self) -> None:
        """Read one of them into the frame cache (only when no request is waiting)."""

    def next_arrival(self) -> float:
        """When the request of the next unit of work arrived (only if `has_work`)."""
        raise NotImplementedError

    def reserve(self) -> Grant:
        """Reserve the memory the next unit of work writes into (only if
        `has_work`); reads nothing unless the frame's size is unknown ahead."""
        return Grant.GRANTED

    def refuse(self, grant: Grant) -> None:
        """Answer the next unit of work with `no_memory`: its frame is larger
        than the budget, or waited too long for room."""

    def work(self) -> None:
        """Do one unit of work (one frame) into the memory `reserve` granted."""

    def tick(self, now: float) -> Optional[float]:
        """Act on the deadlines that passed; returns when the next one is due
        (monotonic time), or None."""
        return None

    def expendable_since(self) -> Optional[float]:
        """Since when the connection has had no complete request, or has sat
        idle holding nothing: it may be closed to make room when the worker
        runs out of descriptors. None while it is in use."""
        return None

    # -- for subclasses ---------------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_eof(self) -> None:
        self.close()

    def send(self, *chunks: Chunk) -> None:
        if self.closed:
            return
        with self.lock:
            self.out.extend(chunks)
        self.flush()
        if len(self.out) > MAX_UNSENT:
            self.close()

    def flush(self) -> None:
        """Send what the socket takes now, running the callbacks of what was
        sent (also of what the sender sent meanwhile)."""
        with self.lock:
            while self.sent_meanwhile:
                self.sent_meanwhile.popleft()()
            if not self._push(self._run_now) and not self.closed:
                self.close()
            elif self.close_after_flush and not self.out:
                self.close()

    def push(self) -> bool:
        """The sender's flush: send what the socket takes now, keeping the
        callbacks for the loop; whether anything is left to send (a socket
        that failed is left to the loop, which closes it)."""
        with self.lock:
            return not self.closed and self._push(self.sent_meanwhile.append) \
                and bool(self.out)

    @staticmethod
    def _run_now(callback: Callable[[], None]) -> None:
        callback()

    def _push(self, done: Callable[[Callable[[], None]], None]) -> bool:
        """Send queued bytes until the socket takes no more, handing each
        callback reached to `done`; False if the socket failed."""
        while self.out and not self.closed:
            chunk = self.out[0]
            if callable(chunk):
                done(self.out.popleft())
                continue
            try:
                n = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if n == len(chunk):
                self.out.popleft()
            else:
                self.out[0] = memoryview(chunk)[n:]
                return True
        return True

    def finish(self) -> None:
        """Close once what is queued has been sent."""
        self.close_after_flush = True
        self.flush()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.out.clear()
            self.sent_meanwhile.clear()
            self.release()
            try:
                self.sock.close()
            except OSError:
                pass

    def release(self) -> None:
        """Give back what the connection holds; runs once, on close."""
