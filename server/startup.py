"""Checks that make `iserver` fail at start-up, in one line, rather than on
every request: a source whose library is missing, a directory that does not
exist, a shared-memory budget no frame fits in.

`StartupError` carries the line a user reads; the CLI prints it after
`iserver:` and exits with `EXIT_STARTUP`.
"""
import argparse
import importlib.util
import logging
import os
import sys
from typing import Dict, Tuple

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
    """Refuse a budget no frame fits in; warn about one larger than /dev/shm."""
    if budget < MIN_BUDGET:
        raise StartupError(f"--shm-budget {format_bytes(budget)} is smaller than one detector "
                           f"frame; give at least 1M (e.g. --shm-budget 2G)")
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return
    size = st.f_frsize * st.f_blocks
    if budget > size:
        log.warning("--shm-budget %s is larger than /dev/shm (%s): frames will fail with "
                    "'no space' before the budget is reached", format_bytes(budget),
                    format_bytes(size))


def check_ready_file(path: str) -> None:
    """The ready file's directory exists and is writable, so the server does not
    start its workers only to fail when it announces itself."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StartupError(f"--ready-file {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"--ready-file {path}: cannot write in {directory}")
