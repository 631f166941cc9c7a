"""A run's files while the DAQ writes them.

The DAQ writes every file of a run under its final name plus `.inprogress`
and renames it once the file is complete: a chunk file when its stream
moves on to the next chunk, the small data and the last chunks when the run
ends. A file is therefore found under either name, and may be renamed
between two looks; an open descriptor keeps reading the same file after
the rename, so a file is opened once and read through its descriptor.
Paths are handled by their final names throughout.
"""
import os
from typing import Optional

INPROGRESS = ".inprogress"


def final_name(path: str) -> str:
    """A path with any .inprogress removed."""
    return path[:-len(INPROGRESS)] if path.endswith(INPROGRESS) else path


def in_progress(path: str) -> bool:
    """Whether the file (by its final name) is still being written."""
    return os.path.exists(path + INPROGRESS)


def present_name(path: str) -> Optional[str]:
    """The name the file (by its final name) has now, or None if it has neither."""
    for name in (path, path + INPROGRESS):
        if os.path.isfile(name):
            return name
    return None


def open_either(path: str) -> int:
    """A read-only descriptor of the file (by its final name), under
    whichever name it has; a rename between the two tries is caught by a
    third. FileNotFoundError if it has neither."""
    for name in (path, path + INPROGRESS, path):
        try:
            return os.open(name, os.O_RDONLY)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"neither {path} nor {path}{INPROGRESS} exists")
