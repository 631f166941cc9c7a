"""What a worker's connections share: settings, the frame reader, the
segment allocator, and how to ask the master to stop."""
import socket
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .frame_reader import FrameReader
from .slots import SegmentAllocator


@dataclass
class WorkerContext:
    reader: FrameReader
    allocator: SegmentAllocator
    shutdown: Callable[[], None]
    stats: Callable[[], Dict[str, object]]
    source: str
    window: int = 8
    max_window: int = 64
    token: Optional[str] = None
    legacy: bool = True
    ack_timeout: float = 30.0
    idle_timeout: float = 30.0
    hostname: str = socket.gethostname()


def is_local_peer(sock: socket.socket) -> bool:
    """A UNIX socket or a loopback TCP peer: one that can map our segments."""
    if sock.family == socket.AF_UNIX:
        return True
    try:
        host = sock.getpeername()[0]
    except OSError:   # the peer has already reset the connection
        return False
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") \
        or host.startswith("::ffff:127.")
