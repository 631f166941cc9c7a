"""A non-blocking connection as a worker's event loop sees it: bytes in,
a queue of bytes out, and one unit of work at a time.

Both dialects subclass `Channel`; the loop only calls the methods here, so
one slow or silent client never blocks the others of the same worker.
"""
import socket
import time
from collections import deque
from typing import Callable, Deque, Optional, Union

RECV_SIZE = 65536
MAX_UNSENT = 4096       # chunks queued for a peer that does not read: then it is dropped
MEMORY_WAIT = 3.0       # how long a frame waits for budget before the error is sent
RETRY_EVERY = 0.1       # a psana source re-reads the event on every retry
# Bytes to send, or a callback run once everything queued before it has been sent.
Chunk = Union[bytes, memoryview, Callable[[], None]]


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.out: Deque[Chunk] = deque()
        self.closed = False
        self.close_after_flush = False
        self.last_activity = time.monotonic()
        self.wake_at: Optional[float] = None        # work waits for memory until then
        self._waiting_since: Optional[float] = None

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

    def next_arrival(self) -> float:
        """When the request of the next unit of work arrived (only if `has_work`)."""
        raise NotImplementedError

    def due(self, now: float) -> bool:
        """False while the connection's work waits for shared memory."""
        return self.wake_at is None or now >= self.wake_at

    def work(self) -> None:
        """Do one unit of work (one frame); called only when `has_work()`."""

    def tick(self, now: float) -> Optional[float]:
        """Check deadlines; returns seconds until the next one, or None."""
        return None

    # -- for subclasses ---------------------------------------------------------------
    def retry_later(self) -> bool:
        """After BudgetExhausted: schedule a retry, unless the frame has waited
        MEMORY_WAIT already (then the caller sends the error)."""
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since > MEMORY_WAIT:
            self.memory_found()
            return False
        self.wake_at = now + RETRY_EVERY
        return True

    def memory_found(self) -> None:
        self._waiting_since = self.wake_at = None

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_eof(self) -> None:
        self.close()

    def send(self, *chunks: Chunk) -> None:
        if self.closed:
            return
        self.out.extend(chunks)
        self.flush()
        if len(self.out) > MAX_UNSENT:
            self.close()

    def flush(self) -> None:
        while self.out and not self.closed:
            chunk = self.out[0]
            if callable(chunk):
                self.out.popleft()()
                continue
            try:
                n = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if n == len(chunk):
                self.out.popleft()
            else:
                self.out[0] = memoryview(chunk)[n:]
                return
        if self.close_after_flush and not self.out:
            self.close()

    def finish(self) -> None:
        """Close once what is queued has been sent."""
        self.close_after_flush = True
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self.release()
        try:
            self.sock.close()
        except OSError:
            pass

    def release(self) -> None:
        """Give back what the connection holds (segments); runs once, on close."""
