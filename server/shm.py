"""Segments in /dev/shm: the one kind of shared memory with a name, a fresh
one per frame of the legacy (btx) dialect, whose clients open it by name.

The server is the only creator and the only one that unlinks. Segments are
opened in /dev/shm directly, which is what POSIX `shm_open` does on Linux:
the standard library's SharedMemory would register every segment with a
resource tracker that unlinks them behind our back when a process exits.
Pages are reserved with `posix_fallocate`, so a full /dev/shm is a clean
error at creation instead of a SIGBUS on the first write. Names carry the
server's and the worker's pid (protocol/shm_names.py) and a random serial:
a name someone else planted is never guessed ahead and is passed over.

Giving a segment back comes in two strengths. `retire` truncates it to zero
length before unlinking: tmpfs frees the pages at once even if a client
still maps the file; only for a segment no client reads any more.
`destroy` only removes the name: a client still reading keeps its pages
until it unmaps. An unlink or truncate that fails is logged, never fatal.
"""
import errno
import logging
import mmap
import os
import secrets
from typing import List, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import NO_MEMORY, ProtocolError
from psana_ipc.protocol.shm_names import (SHM_DIR, is_own_file, ours, segment_name,
                                          segment_path)

log = logging.getLogger(__name__)
NAME_TRIES = 64


def _create(name: str, size: int) -> mmap.mmap:
    path = segment_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ProtocolError(NO_MEMORY, f"/dev/shm has no room for {size} bytes") from e
            raise
        return mmap.mmap(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


class Segment:
    """A segment this worker created: a mapping plus the name clients attach by."""

    def __init__(self, size: int, server_pid: int) -> None:
        for _ in range(NAME_TRIES):
            name = segment_name(server_pid, os.getpid(), secrets.token_hex(8))
            try:
                self.map = _create(name, size)
                break
            except FileExistsError:
                log.warning("/dev/shm/%s exists and is not ours: using another name", name)
        else:
            raise ProtocolError(NO_MEMORY, f"{NAME_TRIES} random segment names in a row exist "
                                           f"in /dev/shm already")
        self.name = name
        self.size = size

    def array(self, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable array at the start of the segment."""
        return np.ndarray(shape, dtype=dtype, buffer=self.map)

    def close(self) -> None:
        """Unmap only: the name stays, for clients to map."""
        try:
            self.map.close()
        except BufferError:
            pass  # a live numpy view pins the mapping; the unlink still frees the name

    def retire(self) -> None:
        """Free the pages now, then the name: for a segment no client reads."""
        self.close()
        truncate(self.name)
        unlink(self.name)

    def destroy(self) -> None:
        """Unmap and unlink only: a client may still be reading it."""
        self.close()
        unlink(self.name)


def our_segments(server_pid: Optional[int] = None,
                 worker_pid: Optional[int] = None) -> List[str]:
    """Segments in /dev/shm a psana-ipc server made (optionally one server's or worker's)."""
    return list(ours(os.listdir(SHM_DIR), server_pid, worker_pid))


def truncate(name: str) -> None:
    try:
        fd = os.open(segment_path(name), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return      # a legacy client unlinked it already
    except OSError as e:
        log.warning("cannot truncate /dev/shm/%s: %s", name, e.strerror)
        return
    try:
        os.ftruncate(fd, 0)
    except OSError as e:
        log.warning("cannot truncate /dev/shm/%s: %s", name, e.strerror)
    finally:
        os.close(fd)


def unlink(name: str) -> bool:
    """Remove a segment's name; False if it was gone or could not be removed
    (logged: a clean-up never fails over someone else's file)."""
    try:
        os.unlink(segment_path(name))
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        log.warning("cannot unlink /dev/shm/%s: %s", name, e.strerror)
        return False


def owned_by_us(name: str) -> bool:
    """A regular file of this user: what a sweep may remove (a name someone else
    planted that looks like ours is not)."""
    try:
        st = os.lstat(segment_path(name))
    except OSError:
        return False
    return is_own_file(st.st_mode, st.st_uid, os.geteuid())


def sweep(server_pid: int, worker_pid: Optional[int] = None) -> int:
    """Unlink the segments of a server (or of one of its workers) that this
    user owns; returns how many."""
    return sum(unlink(name) for name in our_segments(server_pid, worker_pid)
               if owned_by_us(name))
