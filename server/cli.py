"""`iserver`: the command line of the server (also `python -m psana_ipc.server`).

Parses options into `ServerOptions` and runs `app.serve`; every mistake a
user can make ends in one `iserver: ...` line and an exit status from
`startup` (2 for the command line, 3 when the server cannot start as asked).
"""
import argparse
import logging
import sys
from typing import List, Optional

import psana_ipc
from psana_ipc.cli_help import HelpFormatter, epilog

from psana_ipc.protocol.units import parse_size

from . import sources
from .app import ServerOptions, serve
from .startup import EXIT_STARTUP, StartupError

DEFAULTS = ServerOptions(source_options=argparse.Namespace())
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iserver",
        description="Serve detector events (raw, calib, image, mask) from psana, HDF5 or a "
                    "synthetic source to clients in other Python environments, through shared "
                    "memory on this host or inline over TCP. Stop it with Ctrl-C, SIGTERM, "
                    "`psana-ipc stop`, or the legacy DONE message.",
        epilog=epilog(
            ["iserver --workers 4                      synthetic data on 127.0.0.1:5000",
             "iserver --source psana2 --port 5001      LCLS-II runs (psana environment)",
             "iserver --source hdf5 --hdf5-root /data/h5",
             "iserver --unix /tmp/me.sock --ready-file /tmp/me.ready"],
            "exit status: 0 stopped cleanly, 1 failed while running, 2 bad command line,\n"
            "3 could not start as asked (missing package or directory, address in use).",
            "more sources: PSANA_IPC_SOURCES=name=module[,name=module...] adds sources whose\n"
            "module defines `Factory` (see psana_ipc.server.sources.base); they become\n"
            "choices of --source, e.g.\n"
            "  PSANA_IPC_SOURCES=mine=mypkg.source iserver --source mine"),
        formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {psana_ipc.__version__}")
    net = p.add_argument_group("where to listen")
    net.add_argument("--host", default=DEFAULTS.host,
                     help="address to bind: 127.0.0.1 serves this host only; 0.0.0.0 serves "
                          "other nodes too (then set --token-file)")
    net.add_argument("--port", type=int, default=DEFAULTS.port,
                     help="TCP port (0 picks a free one, see --ready-file)")
    net.add_argument("--unix", metavar="PATH",
                     help="listen on a UNIX socket instead of TCP (a stale socket there is "
                          "replaced; anything else is left alone and refused)")
    net.add_argument("--ready-file", metavar="PATH",
                     help="write {address, pid, workers} here as JSON once workers accept; "
                          "removed when the server stops")
    srv = p.add_argument_group("serving")
    srv.add_argument("--source", choices=sorted(sources.available()), default=DEFAULTS.source,
                     help="where events come from (more through $PSANA_IPC_SOURCES, see below)")
    srv.add_argument("--workers", type=int, default=DEFAULTS.workers, metavar="N",
                     help="worker processes")
    srv.add_argument("--open-sources", "--cache-size", dest="open_sources", type=int,
                     default=DEFAULTS.open_sources, metavar="N",
                     help="open sources kept per worker, least recently used dropped")
    srv.add_argument("--frame-cache", type=_size, default=DEFAULTS.frame_cache, metavar="SIZE",
                     help="keep frames sources produced in a cache of this much shared memory, "
                          "e.g. 8G, shared by all workers and clients (v1 and legacy): a frame "
                          "read again costs no psana call. Idle workers take the cache's memory "
                          "ahead, up to SIZE, so the first epoch does not wait for fresh pages "
                          "(0: no cache)")
    srv.add_argument("--frame-cache-dir", metavar="PATH",
                     help="keep the frame cache on node-local disk (e.g. /lscratch) instead of "
                          "in memory, for runs larger than memory: a file without a name in "
                          "PATH, which goes with the server however it stops; --frame-cache "
                          "SIZE bounds it, as does the disk's free space")
    srv.add_argument("--shm-budget", type=_size, default=None, metavar="SIZE",
                     help="shared memory the frames and batches handed to clients may take "
                          "together, e.g. 2G; taken as needed and reused, never given back "
                          "while the server runs (default: half of /dev/shm, at most 4G)")
    srv.add_argument("--window", type=int, default=DEFAULTS.window, metavar="N",
                     help="frames a v1 connection may hold before releasing them")
    srv.add_argument("--max-window", type=int, default=DEFAULTS.max_window, metavar="N",
                     help="largest window a client may ask for")
    srv.add_argument("--ack-timeout", type=float, default=DEFAULTS.ack_timeout, metavar="S",
                     help="seconds a legacy client has to ACK a segment")
    srv.add_argument("--idle-timeout", type=float, default=DEFAULTS.idle_timeout, metavar="S",
                     help="seconds a connection holding nothing may stay idle; a new one "
                          "has at most 10 of them for its first request")
    srv.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout,
                     metavar="S",
                     help="a worker stuck this long reading one event, or frozen, is "
                          "replaced after its traceback is logged")
    sec = p.add_argument_group("access")
    sec.add_argument("--token-file", metavar="PATH",
                     help="require the token in PATH for v1 hello and shutdown, and refuse "
                          "the legacy dialect, which cannot carry one; created (owner-only) "
                          "with a random token if missing, refused if others may read it")
    sec.add_argument("--no-legacy", action="store_true",
                     help="refuse the legacy btx dialect (requests and DONE); implied by "
                          "--token-file")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="how much to log (any case)")
    for name in sorted(sources.available()):
        sources.factory_class(name).add_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    logging.basicConfig(level=namespace.log_level, stream=sys.stderr,
                        format="%(asctime)s iserver[%(process)d] %(levelname)s %(message)s")
    if namespace.shm_budget is None:
        del namespace.shm_budget   # ServerOptions' default: half of /dev/shm
    options = ServerOptions.from_namespace(namespace)
    try:
        options.validate()
    except ValueError as e:
        parser.error(str(e))
    try:
        return serve(options)
    except StartupError as e:
        print(f"iserver: {e}", file=sys.stderr)
        return EXIT_STARTUP
