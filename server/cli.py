"""`iserver`: the command line of the server (also `python -m psana_ipc.server`)."""
import argparse
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
from typing import List, Optional

from psana_ipc.protocol.address import DEFAULT_HOST, DEFAULT_PORT, address_family, format_address

from . import sources
from .context import WorkerContext
from .frame_reader import FrameReader, SourceCache
from .master import Master
from .shared_state import SharedState
from .slots import Budget
from .worker import Worker

log = logging.getLogger("psana_ipc.server")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.I)


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1048576` -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def default_budget() -> int:
    """Half of /dev/shm, at most 4 GiB."""
    try:
        st = os.statvfs("/dev/shm")
        return min(4 << 30, st.f_frsize * st.f_blocks // 2)
    except OSError:
        return 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iserver",
        description="Serve detector events (raw, calib, image, mask) from psana, HDF5 or a "
                    "synthetic source to clients in other Python environments, through shared "
                    "memory on this host or inline over TCP. Stop it with Ctrl-C, SIGTERM, "
                    "`psana-ipc stop`, or the legacy DONE message.",
        epilog="examples:\n"
               "  iserver --workers 4                      synthetic data on 127.0.0.1:5000\n"
               "  iserver --source psana2 --port 5001      LCLS-II runs\n"
               "  iserver --unix /tmp/me.sock --ready-file /tmp/me.ready\n\n"
               "more sources: PSANA_IPC_SOURCES=name=module[,name=module...] adds sources whose\n"
               "module defines `Factory` (see psana_ipc.server.sources.base); they become\n"
               "choices of --source, e.g.\n"
               "  PSANA_IPC_SOURCES=mine=mypkg.source iserver --source mine",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    net = p.add_argument_group("where to listen")
    net.add_argument("--host", default=DEFAULT_HOST,
                     help="address to bind (default: %(default)s, this host only; use 0.0.0.0 "
                          "to serve other nodes, then set --token-file)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help="TCP port (default: %(default)s; 0 picks a free one, see --ready-file)")
    net.add_argument("--unix", metavar="PATH", help="listen on a UNIX socket instead of TCP")
    net.add_argument("--ready-file", metavar="PATH",
                     help="write {address, pid, workers} here as JSON once workers accept; "
                          "removed when the server stops")
    srv = p.add_argument_group("serving")
    srv.add_argument("--source", choices=sorted(sources.available()), default="synthetic",
                     help="where events come from (default: %(default)s; more through "
                          "$PSANA_IPC_SOURCES, see below)")
    srv.add_argument("--workers", type=int, default=5, help="worker processes (default: 5)")
    srv.add_argument("--cache-size", type=int, default=8, metavar="N",
                     help="open sources kept per worker, least recently used dropped "
                          "(default: %(default)s)")
    srv.add_argument("--shm-budget", type=parse_size, default=default_budget(), metavar="SIZE",
                     help="shared memory all workers together may hold, e.g. 2G "
                          "(default: half of /dev/shm, at most 4G)")
    srv.add_argument("--window", type=int, default=8, metavar="N",
                     help="frames a v1 connection may hold before releasing (default: 8)")
    srv.add_argument("--max-window", type=int, default=64, metavar="N",
                     help="largest window a client may ask for (default: 64)")
    srv.add_argument("--ack-timeout", type=float, default=30.0, metavar="S",
                     help="seconds a legacy client has to ACK a segment (default: 30)")
    srv.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                     help="seconds a connection holding nothing may stay idle; a new one "
                          "has at most 10 of them for its first request (default: 60)")
    srv.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                     help="a worker stuck this long reading one event, or frozen, is "
                          "replaced after its traceback is logged (default: 300)")
    sec = p.add_argument_group("access")
    sec.add_argument("--token-file", metavar="PATH",
                     help="require the token in PATH for v1 hello and shutdown, and refuse "
                          "the legacy dialect, which cannot carry one; created (owner-only) "
                          "with a random token if missing, refused if others may read it")
    sec.add_argument("--no-legacy", action="store_true",
                     help="refuse the legacy btx dialect (requests and DONE); implied by "
                          "--token-file")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for name in sorted(sources.available()):
        sources.factory_class(name).add_arguments(p)
    return p


def read_or_create_token(path: str) -> str:
    """The token in `path`, or a new random one written to a new owner-only file.

    An existing file must be a regular file of ours that nobody else may read
    or write: a token another user can read, or planted, protects nothing.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise SystemExit(f"iserver: cannot create the token file {path}: {e.strerror}") from None
    else:
        token = secrets.token_hex(16)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise SystemExit(f"iserver: cannot read the token file {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SystemExit(f"iserver: the token file {path} must be a file of yours that "
                             f"only you can read (chmod 600)")
        token = f.read().strip()
    if not token:
        raise SystemExit(f"iserver: the token file {path} is empty")
    return token


def bind(options: argparse.Namespace) -> socket.socket:
    """The listening socket all workers accept on (owner-only for a UNIX path)."""
    if options.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(options.unix):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(options.unix)
                raise SystemExit(f"iserver: {options.unix} is in use by a running server")
            except ConnectionRefusedError:
                os.unlink(options.unix)   # a dead server's socket file
            finally:
                probe.close()
        old = os.umask(0o177)
        try:
            sock.bind(options.unix)
        finally:
            os.umask(old)
    else:
        sock = socket.socket(getattr(socket, address_family((options.host, options.port))),
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((options.host, options.port))
        except OSError as e:
            raise SystemExit(f"iserver: cannot listen on {options.host}:{options.port}: "
                             f"{e.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def main(argv: Optional[List[str]] = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=options.log_level, stream=sys.stderr,
                        format="%(asctime)s iserver[%(process)d] %(levelname)s %(message)s")
    if options.workers < 1 or options.window < 1:
        raise SystemExit("iserver: --workers and --window must be at least 1")
    factory = sources.factory_class(options.source)(options)
    token = read_or_create_token(options.token_file) if options.token_file else None
    listener = bind(options)
    if token is None and not options.unix and not options.host.startswith("127.") \
            and options.host not in ("::1", "localhost"):
        log.warning("listening on %s without --token-file: anyone who can reach this port "
                    "can read events and stop the server", options.host)
    address = options.unix or listener.getsockname()[:2]
    state = SharedState(options.workers, options.shm_budget)
    master_pid = os.getpid()

    def run_worker(slot: int) -> int:
        counters = state.counters(slot)
        ctx = WorkerContext(
            reader=FrameReader(SourceCache(factory, options.cache_size), counters),
            budget=Budget(state, counters, master_pid), counters=counters,
            shutdown=lambda: os.kill(master_pid, signal.SIGTERM),
            stats=state.stats, source=options.source, window=options.window,
            max_window=options.max_window, token=token,
            legacy=not options.no_legacy and token is None,
            ack_timeout=options.ack_timeout, idle_timeout=options.idle_timeout,
            request_timeout=options.request_timeout)
        try:
            return Worker(listener, state, slot, ctx, master_pid).run()
        finally:
            factory.close()

    ready = {"address": format_address(address), "pid": master_pid, "source": options.source,
             "token_file": os.path.abspath(options.token_file) if options.token_file else None}
    code = Master(listener, state, run_worker, ready, options.ready_file,
                  options.request_timeout).run()
    if options.unix and os.getpid() == master_pid:
        os.unlink(options.unix)
    return code
