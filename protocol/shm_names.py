"""Names of what a server puts in /dev/shm: legacy segments and its lock.

The pool of frame memory has no name (protocol/pool.py); only the legacy
(btx) dialect's segments do, one per frame:
`psipc_<server pid>_<worker pid>_<serial>`: the server pid lets
`psana-ipc cleanup` find what a dead server left, the worker pid lets the
master remove what a dead worker left, without probing other users' files.
`psipc_<server pid>.lock` is the file the live master holds a lock on, so
cleanup can tell a live server from a dead one.

Only names here: listing /dev/shm is the job of the code that sweeps it.
"""
import re
import stat
from typing import Iterable, Iterator, NamedTuple, Optional

PREFIX = "psipc"
SHM_DIR = "/dev/shm"
_NAME = re.compile(rf"^{PREFIX}_(\d+)_(\d+)_(\w+)$")
_LOCK = re.compile(rf"^{PREFIX}_(\d+)\.lock$")


class SegmentName(NamedTuple):
    server_pid: int
    worker_pid: int
    serial: str


def segment_name(server_pid: int, worker_pid: int, serial: str) -> str:
    return f"{PREFIX}_{server_pid}_{worker_pid}_{serial}"


def parse_segment_name(name: str) -> Optional[SegmentName]:
    m = _NAME.match(name.lstrip("/"))
    return SegmentName(int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def lock_name(server_pid: int) -> str:
    return f"{PREFIX}_{server_pid}.lock"


def parse_lock_name(name: str) -> Optional[int]:
    """The server pid of a lock file's name, or None."""
    m = _LOCK.match(name)
    return int(m.group(1)) if m else None


def is_own_file(mode: int, owner: int, user: int) -> bool:
    """Whether a file of this `st_mode` and owner is one `user` may open, lock
    or remove under one of these names: a regular file of theirs, never a
    link, a directory or another user's file that only looks like ours."""
    return stat.S_ISREG(mode) and owner == user


def segment_path(name: str) -> str:
    return f"{SHM_DIR}/{name.lstrip('/')}"


def ours(names: Iterable[str], server_pid: Optional[int] = None,
         worker_pid: Optional[int] = None) -> Iterator[str]:
    """The names among `names` (a listing of /dev/shm) that a psana-ipc server
    made, optionally only one server's or one worker's."""
    for name in names:
        parsed = parse_segment_name(name)
        if parsed is None:
            continue
        if server_pid is not None and parsed.server_pid != server_pid:
            continue
        if worker_pid is not None and parsed.worker_pid != worker_pid:
            continue
        yield name
