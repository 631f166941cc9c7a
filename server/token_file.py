"""The shared secret of `iserver --token-file`: read it, or create it owner-only.

A token another user can read, or a file another user planted, protects
nothing; a FIFO or device at the path must not hang the start-up. So an
existing file is opened without following symlinks and without blocking,
and must be a regular file of ours that nobody else may read or write.
"""
import os
import secrets
import stat

from .startup import StartupError


def read_or_create_token(path: str) -> str:
    """The token in `path`, or a new random one written to a new owner-only file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as e:
        raise StartupError(f"cannot create the token file {path}: {e.strerror}") from None
    token = secrets.token_hex(16)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _read_token(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise StartupError(f"cannot read the token file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"the token file {path} is not a regular file")
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise StartupError(f"the token file {path} must be a file of yours that only you "
                               f"can read (chmod 600)")
        token = f.read(4096).decode("utf-8", "replace").strip()
    if not token:
        raise StartupError(f"the token file {path} is empty")
    return token
