"""A server wired from options: what `iserver` runs, callable from Python and tests.

    from psana_ipc.server.app import ServerOptions, serve
    serve(ServerOptions(source="synthetic", port=0, workers=2, ready_file="r.json"))

`ServerOptions` holds the server's own settings (their defaults are the
CLI's) and `source_options`: the data sources' options as a namespace, built
by `sources.source_options` from the sources' own declarations.
"""
import argparse
import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Dict, Optional

from psana_ipc.protocol.address import DEFAULT_HOST, DEFAULT_PORT, format_address, is_loopback
from psana_ipc.protocol.shm_names import SHM_DIR

from . import cache_dir, sources, startup
from .context import WorkerContext
from .frame_cache import FrameCache, check_room, source_fingerprint
from .frame_reader import FrameReader, SourceCache
from .listener import bind_tcp, bind_unix
from .master import SHUTDOWN_SIGNAL, Master
from .shared_state import SharedState
from .slots import Budget
from .startup import StartupError
from .token_file import read_or_create_token
from .worker import Worker

log = logging.getLogger("psana_ipc.server")


def default_budget() -> int:
    """Half of /dev/shm, at most 4 GiB."""
    try:
        st = os.statvfs("/dev/shm")
        return min(4 << 30, st.f_frsize * st.f_blocks // 2)
    except OSError:
        return 1 << 30


@dataclass
class ServerOptions:
    """Everything a server is started with; the defaults are iserver's."""
    source: str = "synthetic"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix: Optional[str] = None
    ready_file: Optional[str] = None
    workers: int = 5
    open_sources: int = 8
    frame_cache: int = 0
    frame_cache_dir: Optional[str] = None
    shm_budget: int = field(default_factory=default_budget)
    window: int = 8
    max_window: int = 64
    ack_timeout: float = 30.0
    idle_timeout: float = 60.0
    request_timeout: float = 300.0
    token_file: Optional[str] = None
    no_legacy: bool = False
    source_options: argparse.Namespace = field(default_factory=sources.source_options)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "ServerOptions":
        """Split a parsed command line into the server's options and the sources'."""
        values = vars(namespace)
        own = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        theirs = sources.source_options()
        vars(theirs).update((k, v) for k, v in values.items() if k in vars(theirs))
        return cls(**own, source_options=theirs)

    @property
    def cache_keeps_free(self) -> int:
        """Room the frame cache leaves free for slots: the slots' budget in
        /dev/shm, nothing on disk."""
        return 0 if self.frame_cache_dir else self.shm_budget

    def validate(self) -> None:
        """Raise ValueError naming the first option whose value cannot work."""
        at_least_one = {"workers": self.workers, "open-sources": self.open_sources,
                        "window": self.window, "max-window": self.max_window}
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"--{name} must be at least 1, not {value}")
        if self.window > self.max_window:
            raise ValueError(f"--window {self.window} is larger than --max-window "
                             f"{self.max_window}")
        if self.frame_cache < 0:
            raise ValueError(f"--frame-cache must be a size >= 0, not {self.frame_cache}")
        if self.frame_cache_dir and not self.frame_cache:
            raise ValueError("--frame-cache-dir needs --frame-cache SIZE (the bound on disk)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, not {self.port}")
        timeouts = {"ack-timeout": self.ack_timeout, "idle-timeout": self.idle_timeout,
                    "request-timeout": self.request_timeout}
        for name, value in timeouts.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a positive number of seconds, not {value}")
        for name, value in vars(self.source_options).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, "
                                 f"not {value}")


def open_factory(options: ServerOptions) -> sources.SourceFactory:
    """The source's factory, after everything that can be known wrong before a
    worker starts (ValueError for a bad value, StartupError for the
    environment); the factory checks its own options as it is made."""
    options.validate()
    if options.source not in sources.available():
        raise StartupError(f"no source {options.source!r}; available: "
                           f"{', '.join(sorted(sources.available()))}")
    startup.check_source_library(options.source)
    factory = sources.factory_class(options.source)(options.source_options)
    startup.check_directories(options.source_options)
    startup.check_budget(options.shm_budget)
    if options.frame_cache_dir and not os.path.isdir(options.frame_cache_dir):
        raise StartupError(f"--frame-cache-dir {options.frame_cache_dir} is not a directory")
    if options.frame_cache:
        why = check_room(options.frame_cache, options.frame_cache_dir or SHM_DIR,
                         options.cache_keeps_free)
        if why:
            raise StartupError(why)
    if options.ready_file:
        startup.check_ready_file(options.ready_file)
    return factory


def serve(options: ServerOptions) -> int:
    """Run a server until it is stopped; its exit status (see startup.EXIT_*)."""
    factory = open_factory(options)
    token = read_or_create_token(options.token_file) if options.token_file else None
    listener = bind_unix(options.unix) if options.unix else bind_tcp(options.host, options.port)
    if token is None and not options.unix and not is_loopback(options.host):
        log.warning("listening on %s without --token-file: anyone who can reach this port "
                    "can read events and stop the server", options.host)
    address = options.unix or listener.getsockname()[:2]
    state = SharedState(options.workers, options.shm_budget)
    master_pid = os.getpid()
    cache = None
    if options.frame_cache:
        directory = (cache_dir.make(options.frame_cache_dir, master_pid)
                     if options.frame_cache_dir else SHM_DIR)
        cache = FrameCache(options.frame_cache, options.workers, master_pid, source_fingerprint(
            options.source, sources.factory_class(options.source).add_arguments,
            options.source_options), directory, options.cache_keeps_free)

    def stats() -> Dict[str, object]:
        return dict(state.stats(), frame_cache=cache.stats() if cache else None)

    def run_worker(slot: int) -> int:
        counters = state.counters(slot)
        ctx = WorkerContext(
            reader=FrameReader(SourceCache(factory, options.open_sources), counters),
            budget=Budget(state, counters, master_pid), counters=counters,
            shutdown=lambda: os.kill(master_pid, SHUTDOWN_SIGNAL),
            stats=stats, source=options.source, window=options.window,
            max_window=options.max_window, token=token,
            legacy=not options.no_legacy and token is None,
            ack_timeout=options.ack_timeout, idle_timeout=options.idle_timeout,
            request_timeout=options.request_timeout,
            cache=cache.worker(slot) if cache else None)
        try:
            factory.prepare_worker()
            return Worker(listener, state, slot, ctx, master_pid).run()
        finally:
            factory.close()

    ready: Dict[str, object] = {
        "address": format_address(address), "pid": master_pid, "source": options.source,
        "shm_budget": options.shm_budget,
        "token_file": os.path.abspath(options.token_file) if options.token_file else None}
    master = Master(listener, state, run_worker, ready, options.ready_file,
                    options.request_timeout)
    if cache is not None:
        master.on_worker_death = cache.worker_died
    try:
        code = master.run()
    finally:
        if cache is not None and cache.on_disk and os.getpid() == master_pid:
            cache_dir.remove(cache.directory, master_pid)
    if options.unix and os.getpid() == master_pid:
        os.unlink(options.unix)
    return code
