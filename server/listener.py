"""The listening socket every worker accepts on.

A UNIX socket path is only ever taken over from a dead server: a socket of
ours that nobody answers is removed; a live server's socket, another user's
socket, or anything that is not a socket (a user's file) is left untouched
and start-up fails with one line.
"""
import errno
import os
import socket
import stat
from psana_ipc.protocol.address import address_family

from .startup import StartupError


def bind_unix(path: str) -> socket.socket:
    """A listening owner-only UNIX socket at `path`."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {_reason(e)}") from None
    finally:
        os.umask(old)
    return _listen(sock)


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    sock = socket.socket(getattr(socket, address_family((host, port))), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {_reason(e)}") from None
    return _listen(sock)


def _listen(sock: socket.socket) -> socket.socket:
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StartupError(f"cannot use {path}: {_reason(e)}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; it was left untouched: "
                           f"choose another --unix path")
    if st.st_uid != os.getuid():
        raise StartupError(f"{path} is a socket of another user; it was left untouched: "
                           f"choose another --unix path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)   # a dead server's socket
        return
    except OSError as e:
        raise StartupError(f"cannot use {path}: {_reason(e)}") from None
    finally:
        probe.close()
    raise StartupError(f"{path} is in use by a running server")


def _reason(e: OSError) -> str:
    if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
        return "the address is in use (another server?)"
    return e.strerror or str(e)
