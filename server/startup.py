"""Checks that make `iserver` fail at start-up, in one line, rather than on
every request: a source whose library is missing, a directory that does not
exist, a shared-memory budget no frame fits in, a pool larger than the node.

`StartupError` carries the line a user reads; the CLI prints it after
`iserver:` and exits with `EXIT_STARTUP`.
"""
import argparse
import importlib.util
import logging
import os
import sys
from typing import Dict, Optional, Tuple

from psana_ipc.protocol.units import format_bytes

log = logging.getLogger(__name__)

EXIT_FAILED = 1     # started, then failed (workers could not boot)
EXIT_USAGE = 2      # argparse's: a malformed command line or an option value out of range
EXIT_STARTUP = 3    # could not start as asked: missing package, directory, address in use, ...

# The smallest budget any detector frame fits in (epix100, 704x768 uint16, is 1.03 MiB).
MIN_BUDGET = 1 << 20
_PSANA_HINT = "run iserver with the psana environment's python (e.g. after psconda.sh)"
# source -> (module it needs, what to do without it)
REQUIRED_MODULES: Dict[str, Tuple[str, str]] = {
    "psana2": ("psana", _PSANA_HINT),
    "psana1": ("psana", _PSANA_HINT),
    "hdf5": ("h5py", "pip install 'psana-ipc[hdf5]'"),
}
# source options naming a directory that must exist when given (for a template such as
# /data/{exp}/xtc, the fixed part before the first field)
DIRECTORY_OPTIONS = ("data_dir", "data_root", "calib_dir", "hdf5_root")


class StartupError(Exception):
    """The server cannot start as asked; the message says why and what to do."""


def check_source_library(source: str) -> None:
    """The library a source reads with is importable here (found, not imported:
    importing psana takes seconds)."""
    module, hint = REQUIRED_MODULES.get(source, ("", ""))
    if module and importlib.util.find_spec(module) is None:
        raise StartupError(f"--source {source} needs the {module} module, which this python "
                           f"({os.path.realpath(sys.executable)}) lacks: {hint}")


def check_directories(source_options: argparse.Namespace) -> None:
    for name in DIRECTORY_OPTIONS:
        path = getattr(source_options, name, None)
        if path is None:
            continue
        fixed = path if "{" not in path else os.path.dirname(path[:path.index("{")]) or "."
        if not os.path.isdir(fixed):
            raise StartupError(f"--{name.replace('_', '-')} {path}: no such directory"
                               + (f" {fixed}" if fixed != path else ""))


def check_budget(budget: int) -> None:
    """Refuse a budget no frame fits in."""
    if budget < MIN_BUDGET:
        raise StartupError(f"--shm-budget {format_bytes(budget)} is smaller than one detector "
                           f"frame; give at least 1M (e.g. --shm-budget 2G)")


def memory_info() -> Dict[str, int]:
    """/proc/meminfo's MemTotal and MemAvailable, in bytes (empty where unknown)."""
    found = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    found[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def check_memory(in_memory: int, frame_cache: int, cache_dir: Optional[str]) -> None:
    """The pool in memory (--shm-budget, and --frame-cache unless on disk)
    must fit in the node's memory (a warning if more than is free now); a
    frame cache on disk must fit on its disk (a warning if not free now)."""
    info = memory_info()
    what = "--shm-budget" + ("" if cache_dir or not frame_cache else " and --frame-cache")
    if in_memory > info.get("MemTotal", in_memory):
        raise StartupError(f"{what} ({format_bytes(in_memory)}) are more than this node's "
                           f"memory ({format_bytes(info['MemTotal'])})")
    if in_memory > info.get("MemAvailable", in_memory):
        log.warning("%s (%s) are more than the memory available now (%s): frames will be "
                    "refused 'no_memory' before that is reached", what,
                    format_bytes(in_memory), format_bytes(info["MemAvailable"]))
    if cache_dir:
        st = os.statvfs(cache_dir)
        size, free = st.f_frsize * st.f_blocks, st.f_frsize * st.f_bavail
        if frame_cache > size:
            raise StartupError(f"--frame-cache {format_bytes(frame_cache)} is more than "
                               f"{cache_dir} holds ({format_bytes(size)})")
        if frame_cache > free:
            log.warning("--frame-cache %s is more than %s has free (%s): the cache will "
                        "hold at most that", format_bytes(frame_cache), cache_dir,
                        format_bytes(free))


def check_ready_file(path: str) -> None:
    """The ready file's directory exists and is writable, so the server does not
    start its workers only to fail when it announces itself."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StartupError(f"--ready-file {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"--ready-file {path}: cannot write in {directory}")
