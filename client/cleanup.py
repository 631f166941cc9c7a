"""`psana-ipc cleanup`: remove the shared memory of servers that are gone.

A server is alive while its master holds the lock on /dev/shm/psipc_<pid>.lock
(see server/liveness.py): a lock that can be taken is a dead server's, never
a guess from a command line. Only this user's files are touched; what cannot
be removed, or belongs to someone else, is skipped and reported. The
server's pool of frame memory and a frame cache on disk have no name and
go with the server's last process: only legacy segments and lock files can
be left.
"""
import errno
import fcntl
import os
from typing import Dict, List

from psana_ipc.protocol.shm_names import (SHM_DIR, is_own_file, lock_name, parse_lock_name,
                                          parse_segment_name, segment_path)

from .shm import our_segments

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"


def _ours(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return is_own_file(st.st_mode, st.st_uid, os.geteuid())


def server_state(pid: int) -> str:
    """ALIVE while the server's master holds its lock, DEAD once the lock can be
    taken, UNKNOWN for a lock file of another user; without a lock file (a
    server older than the lock) a running process of that pid counts as alive."""
    path = segment_path(lock_name(pid))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ALIVE if os.path.exists(f"/proc/{pid}") else DEAD
    except OSError:
        return UNKNOWN
    try:
        if not _ours(path):
            return UNKNOWN
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return ALIVE
            raise
        return DEAD
    finally:
        os.close(fd)


def _remove(path: str, skipped: List[str]) -> bool:
    if not _ours(path):
        skipped.append(f"{path}: not this user's")
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        skipped.append(f"{path}: {e.strerror}")
        return False


def cleanup() -> List[str]:
    """Remove what dead servers left; returns lines saying what was done and skipped."""
    by_server: Dict[int, List[str]] = {}
    for name in our_segments():
        by_server.setdefault(parse_segment_name(name).server_pid, []).append(name)
    for name in os.listdir(SHM_DIR):
        pid = parse_lock_name(name)
        if pid is not None:
            by_server.setdefault(pid, [])
    lines, skipped, removed = [], [], 0
    for pid, names in sorted(by_server.items()):
        state = server_state(pid)
        if state == ALIVE:
            lines.append(f"server {pid} is running: kept its {len(names)} segment(s)")
            continue
        if state == UNKNOWN:
            lines.append(f"server {pid}: its lock file is not this user's: kept its "
                         f"{len(names)} segment(s)")
            continue
        removed += sum(_remove(segment_path(n), skipped) for n in names)
        lock = segment_path(lock_name(pid))
        if os.path.lexists(lock):
            _remove(lock, skipped)
    lines += [f"skipped {s}" for s in skipped]
    lines.append(f"removed {removed} segment(s) left by servers that are gone")
    return lines
