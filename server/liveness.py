"""The lock that tells `psana-ipc cleanup` this server is alive.

The master holds an exclusive `flock` on /dev/shm/psipc_<pid>.lock (beside
its segments, on the same node-wide tmpfs) for as long as it runs, and
removes the file when it stops (orphaned workers do, if the master was
killed). The kernel drops the lock when the last process holding it (the
master and the workers that inherited it) dies, so a lock that can be taken
means a dead server, whatever its command line looked like. A lock file someone else planted is
left alone: the server runs without one (cleanup then keeps its segments).
"""
import fcntl
import logging
import os
from typing import Optional

from psana_ipc.protocol.shm_names import is_own_file, lock_name, segment_path

log = logging.getLogger(__name__)


def _open_ours(path: str) -> Optional[int]:
    try:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600)
    except FileExistsError:
        pass
    try:                          # left by a killed server that had our pid
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not is_own_file(st.st_mode, st.st_uid, os.geteuid()):
        os.close(fd)
        return None
    return fd


def hold(server_pid: int) -> Optional[int]:
    """Take the liveness lock; the descriptor to pass to `release`, or None."""
    path = segment_path(lock_name(server_pid))
    try:
        fd = _open_ours(path)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
    except OSError as e:
        log.warning("cannot lock %s (%s)", path, e.strerror)
    else:
        log.warning("%s exists and is not ours", path)
    log.warning("running without a liveness lock: psana-ipc cleanup will keep this "
                "server's segments even after it stops")
    return None


def release(fd: Optional[int], server_pid: int) -> None:
    if fd is None:
        return
    try:
        os.unlink(segment_path(lock_name(server_pid)))
    except OSError as e:
        log.warning("cannot remove the liveness lock: %s", e.strerror)
    os.close(fd)


def abandon(server_pid: int) -> None:
    """The master died without stopping: its last orphaned workers remove the
    lock file (each tries; they exit right after)."""
    path = segment_path(lock_name(server_pid))
    try:
        if os.lstat(path).st_uid == os.geteuid():
            os.unlink(path)
    except OSError:
        pass
