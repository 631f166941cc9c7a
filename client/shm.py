"""Attaching to a legacy segment in /dev/shm (the btx dialect hands out one
per frame, by name), read-only, without Python's resource tracker.

The standard library's SharedMemory registers every attach with the
resource tracker (before 3.13), which then warns about "leaked" segments or
unlinks them when the attaching process exits: wrong for a segment the
server owns. Opening /dev/shm directly, as shm_open does on Linux, involves
no tracker on any Python version. The attacher only ever closes; the server
unlinks, and so does `psana-ipc cleanup` for servers that died, from the
listing of /dev/shm made here.
"""
import mmap
import os
from typing import List

from psana_ipc.protocol.shm_names import SHM_DIR, ours, segment_path


def our_segments() -> List[str]:
    """Segments in /dev/shm that psana-ipc servers made (none where there is no /dev/shm)."""
    try:
        return list(ours(os.listdir(SHM_DIR)))
    except FileNotFoundError:
        return []


def attach(name: str) -> mmap.mmap:
    """Map a segment read-only; the mapping outlives the name's unlink."""
    fd = os.open(segment_path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
