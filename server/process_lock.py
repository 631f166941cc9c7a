"""A lock between the processes of one server: a POSIX record lock on an
anonymous file made before forking. The kernel drops it when its holder
dies, so a SIGKILLed worker cannot wedge the others. Not reentrant."""
import fcntl
import tempfile
from contextlib import contextmanager
from typing import Iterator


class ProcessLock:
    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()

    @contextmanager
    def held(self) -> Iterator[None]:
        fcntl.lockf(self._file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._file, fcntl.LOCK_UN)
