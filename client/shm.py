"""Attaching to the server's segments, read-only, without Python's resource
tracker.

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
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.shm_names import SHM_DIR, ours, segment_path


def our_segments() -> List[str]:
    """Segments in /dev/shm that psana-ipc servers made (none where there is no /dev/shm)."""
    try:
        return list(ours(os.listdir(SHM_DIR)))
    except FileNotFoundError:
        return []


def attach(name: str, writable: bool = False, path: Optional[str] = None) -> mmap.mmap:
    """Map a segment (or the file at `path`), read-only unless asked; the
    mapping outlives the name's unlink."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path or segment_path(name), flags)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)


class SlotMaps:
    """Mappings of one connection's slots, reused for every frame in a slot.

    Views are read-only unless `writable`: that is for code that insists on
    writable arrays (torch.as_tensor warns otherwise) and never writes them.
    """

    def __init__(self, writable: bool = False) -> None:
        self.writable = writable
        self._maps: Dict[int, Tuple[str, mmap.mmap]] = {}

    def view(self, slot: int, name: str, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A read-only array over a slot; valid until the slot is released."""
        held = self._maps.get(slot)
        if held is None or held[0] != name:
            if held is not None:
                _close(held[1])
            held = (name, attach(name, self.writable))
            self._maps[slot] = held
        return np.ndarray(tuple(shape), dtype=dtype, buffer=held[1])

    def drop(self, slots: Sequence[int]) -> None:
        """Forget the mappings of slots the server retired (truncated and
        unlinked): their pages are gone, and their ids never come back."""
        for slot in slots:
            held = self._maps.pop(slot, None)
            if held is not None:
                _close(held[1])

    def close(self) -> None:
        for _, m in self._maps.values():
            _close(m)
        self._maps.clear()


class EntryMaps:
    """Mappings of the blocks of the server's frame cache, each made once and
    kept: an entry is a frame at an offset in a block (a file in /dev/shm,
    or at `path` for a cache on disk), read only while the server pins it
    for this client. At most `keep` mappings are kept, the least recently
    used closed first.
    """

    def __init__(self, writable: bool = False, keep: int = 4096) -> None:
        self.writable = writable
        self.keep = keep
        self._maps: "OrderedDict[str, mmap.mmap]" = OrderedDict()

    def view(self, name: str, shape: Sequence[int], dtype: np.dtype,
             offset: int = 0, path: Optional[str] = None) -> np.ndarray:
        m = self._maps.get(name)
        if m is None:
            m = self._maps[name] = attach(name, self.writable, path)
            while len(self._maps) > self.keep:
                _close(self._maps.popitem(last=False)[1])
        else:
            self._maps.move_to_end(name)
        return np.ndarray(tuple(shape), dtype=dtype, buffer=m, offset=offset)

    def close(self) -> None:
        for m in self._maps.values():
            _close(m)
        self._maps.clear()


def _close(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:
        pass  # a zero-copy view still uses it; the mapping goes when that view does
