"""The door: where a local client gets the server's pools, as descriptors,
once per process.

A UNIX socket in the abstract namespace (no file to leave behind or to
plant), named with the server's pid and a random part, bound by the master
before it forks; every worker accepts on it. A connection gets one message
(protocol.pool's `door_message`) with a read-only descriptor of each pool
beside it (SCM_RIGHTS), and is closed. Only a peer of the server's own user
is answered (SO_PEERCRED): the same user who could open the server's files
anyway; anyone else is closed on at once. The hello reply names the door
to connections that share memory with the server.
"""
import logging
import os
import secrets
import socket
import struct
from typing import List

from psana_ipc.protocol.pool import door_message

from .pool_pages import PoolFile

log = logging.getLogger(__name__)
_CREDENTIALS = struct.Struct("3i")      # struct ucred: pid, uid, gid


def open_door(server_pid: int) -> socket.socket:
    """The master's listening door, non-blocking; its name is `door_name`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            sock.bind(f"\0psana-ipc-{server_pid}-{secrets.token_hex(8)}")
            break
        except OSError:         # taken (by chance, or planted): another random name
            continue
    sock.listen(64)
    sock.setblocking(False)
    return sock


def door_name(door: socket.socket) -> str:
    """The name clients connect to (without the abstract namespace's NUL)."""
    return door.getsockname()[1:].decode()


def answer(door: socket.socket, pools: List[PoolFile]) -> None:
    """Hand the pools to one waiting client of this user, if there is one."""
    try:
        conn, _ = door.accept()
    except (BlockingIOError, InterruptedError):
        return
    with conn:
        pid, uid, _ = _CREDENTIALS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        if uid != os.geteuid():
            log.warning("door: refused process %d of user %d", pid, uid)
            return
        fds = [pool.for_client() for pool in pools]
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            socket.send_fds(conn, [door_message([(p.id, p.size) for p in pools])], fds)
        except OSError as e:
            log.debug("door: process %d left before its pools were sent (%s)", pid, e)
        finally:
            for fd in fds:
                os.close(fd)
