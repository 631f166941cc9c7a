"""Shared-memory segments as the server creates them.

The server is the only creator and the only one that unlinks. Segments are
opened in /dev/shm directly, which is what POSIX `shm_open` does on Linux:
the standard library's SharedMemory would register every segment with a
resource tracker that unlinks them behind our back when a process exits.
Pages are reserved with `posix_fallocate`, so a full /dev/shm is a clean
error at creation instead of a SIGBUS on the first write.
"""
import errno
import mmap
import os
from typing import List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.shm_names import SHM_DIR, ours, segment_path

PAGE = mmap.PAGESIZE


class ShmFullError(OSError):
    """/dev/shm has no room for the segment asked for."""


def round_up(nbytes: int) -> int:
    return max(PAGE, -(-nbytes // PAGE) * PAGE)


class Segment:
    """A segment this process created: a mapping plus the name clients attach by."""

    def __init__(self, name: str, size: int) -> None:
        path = segment_path(name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise ShmFullError(e.errno, f"/dev/shm has no room for {size} bytes") from e
                raise
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.name = name
        self.size = size

    def array(self, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable array at the start of the segment."""
        return np.ndarray(shape, dtype=dtype, buffer=self.map)

    def destroy(self) -> None:
        """Unmap and unlink; a peer that already unlinked it is not an error."""
        try:
            self.map.close()
        except BufferError:
            pass  # a live numpy view pins the mapping; the unlink below still frees the name
        unlink(self.name)


def our_segments(server_pid: Optional[int] = None,
                 worker_pid: Optional[int] = None) -> List[str]:
    """Segments in /dev/shm a psana-ipc server made (optionally one server's or worker's)."""
    return list(ours(os.listdir(SHM_DIR), server_pid, worker_pid))


def unlink(name: str) -> bool:
    try:
        os.unlink(segment_path(name))
        return True
    except FileNotFoundError:
        return False
