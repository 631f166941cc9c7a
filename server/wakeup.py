"""A self-pipe that signals write to, so a process blocked in select wakes
at once when a signal arrives (the handler itself only records it)."""
import os
import signal
from typing import Tuple


def wakeup_pipe() -> Tuple[int, int]:
    """A non-blocking pipe installed as the signal wakeup fd; returns (read, write)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    return read_fd, write_fd


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
