"""What a worker's connections share: settings, the frame reader, the
pool's memory and the frame cache, the worker's counters, and how to ask
the master to stop."""
import itertools
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional

from psana_ipc.protocol.address import is_loopback

from .frame_cache import FrameCache
from .frame_memory import FrameMemory
from .frame_reader import FrameReader
from .shared_state import Counters

FIRST_REQUEST_WITHIN = 10.0   # seconds a connection has for hello (v1) or its request (legacy)


@dataclass
class WorkerContext:
    reader: FrameReader
    memory: FrameMemory
    counters: Counters
    shutdown: Callable[[bool], None]        # True: a legacy DONE asked for it
    stats: Callable[[], Dict[str, object]]
    source: str
    server_pid: int
    workers: int = 1                        # the server's, told in the hello reply
    window: int = 8
    max_window: int = 64
    token: Optional[str] = None
    legacy: bool = True
    ack_timeout: float = 30.0
    idle_timeout: float = 30.0
    request_timeout: float = 300.0
    hostname: str = socket.gethostname()
    cache: Optional[FrameCache] = None      # iserver --frame-cache
    door: str = ""                          # where local clients get the pools (door.py)
    _serials: Iterator[int] = field(default_factory=itertools.count)

    def next_connection(self) -> int:
        """A number for a new connection, unique in this worker."""
        return next(self._serials)

    @property
    def first_request_within(self) -> float:
        """Seconds a new connection has for its first complete request."""
        return min(FIRST_REQUEST_WITHIN, self.idle_timeout)


def is_local_peer(sock: socket.socket) -> bool:
    """A UNIX socket or a loopback TCP peer: one that can map our segments."""
    if sock.family == socket.AF_UNIX:
        return True
    try:
        host = sock.getpeername()[0]
    except OSError:   # the peer has already reset the connection
        return False
    return is_loopback(host)
