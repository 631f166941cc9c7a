"""`--frame-cache-dir PATH`: the frame cache's blocks on node-local disk
(S3DF's /lscratch) instead of /dev/shm, for runs larger than memory.

The server makes a directory of its own, `PATH/psana-ipc-<server pid>`,
owner-only (0700), and names it in a marker in /dev/shm
(`psipc_<pid>_<pid>_dir`, see protocol/shm_names.py): every stop
removes the directory, and `psana-ipc cleanup` finds, through the marker,
the one a killed server left. Only files of ours are ever removed: regular
files of this user named like the server's segments.
"""
import logging
import os

from psana_ipc.protocol.shm_names import cache_dir_marker, is_own_file, ours, segment_path

from .private_file import write_atomically
from .startup import StartupError

log = logging.getLogger(__name__)


def make(parent: str, server_pid: int) -> str:
    """The server's own directory under `parent`, made owner-only, and its marker."""
    path = os.path.join(os.path.abspath(parent), f"psana-ipc-{server_pid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise StartupError(f"{path} exists already (left by a server that was killed? "
                           f"`psana-ipc cleanup` removes it)") from None
    except OSError as e:
        raise StartupError(f"cannot make {path}: {e.strerror}") from None
    os.chmod(path, 0o700)           # whatever the umask
    write_atomically(segment_path(cache_dir_marker(server_pid)), path)
    return path


def remove(path: str, server_pid: int) -> None:
    """Remove our files in the directory, the directory, and its marker."""
    for name in ours(os.listdir(path), server_pid):
        file = os.path.join(path, name)
        st = os.lstat(file)
        if is_own_file(st.st_mode, st.st_uid, os.geteuid()):
            os.unlink(file)
    try:
        os.rmdir(path)
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror)
    try:
        os.unlink(segment_path(cache_dir_marker(server_pid)))
    except FileNotFoundError:
        pass
