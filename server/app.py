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
from typing import Dict, List, Optional, Tuple

from psana_ipc.protocol.address import DEFAULT_HOST, DEFAULT_PORT, format_address, is_loopback

from . import sources, startup
from .context import WorkerContext
from .door import door_name, open_door
from .frame_cache import FrameCache, source_fingerprint
from .frame_memory import SHM_POOL, FrameMemory
from .frame_reader import FrameReader, OpenSources
from .listener import bind_tcp, bind_unix
from .master import DONE_SIGNAL, SHUTDOWN_SIGNAL, Master
from .pool_index import Index
from .pool_pages import PoolFile
from .shared_state import SharedState
from .startup import StartupError
from .token_file import read_or_create_token
from .worker import Worker

log = logging.getLogger("psana_ipc.server")
ROWS = 65536        # rows of the pool's index: extents in use and connections at once


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
    def pools(self) -> List[Tuple[int, Optional[str]]]:
        """(size, directory) of each pool: memory for the budget (and the frame
        cache, unless it is on disk), then the cache's file on disk."""
        in_memory = self.shm_budget + (0 if self.frame_cache_dir else self.frame_cache)
        on_disk = [(self.frame_cache, self.frame_cache_dir)] if self.frame_cache_dir else []
        return [(in_memory, None)] + on_disk

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
    startup.check_memory(options.shm_budget + options.frame_cache * (not options.frame_cache_dir),
                         options.frame_cache, options.frame_cache_dir)
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
    state = SharedState(options.workers)
    master_pid = os.getpid()
    try:
        pools = [PoolFile(pid, size, directory)
                 for pid, (size, directory) in enumerate(options.pools)]
    except OSError as e:
        raise StartupError(f"cannot make the pool of frame memory: {e.strerror}") from None
    index = Index(ROWS, options.workers, options.shm_budget, options.frame_cache)
    door = open_door(master_pid)
    fingerprint = source_fingerprint(options.source,
                                     sources.factory_class(options.source).add_arguments,
                                     options.source_options)
    cache_pool = len(pools) - 1 if options.frame_cache else None

    def run_worker(slot: int) -> int:
        counters = state.counters(slot)
        memory = FrameMemory(index, pools, slot, warm_target=options.frame_cache
                             if cache_pool == SHM_POOL else 0)
        cache = FrameCache(memory, fingerprint, cache_pool) if cache_pool is not None else None

        def stats() -> Dict[str, object]:
            return dict(state.stats(), **index.budget_stats(),
                        frame_cache=cache.stats() if cache is not None else None)
        ctx = WorkerContext(
            reader=FrameReader(OpenSources(factory, options.open_sources), counters),
            memory=memory, counters=counters,
            shutdown=lambda done: os.kill(master_pid, DONE_SIGNAL if done else SHUTDOWN_SIGNAL),
            stats=stats, source=options.source, server_pid=master_pid,
            workers=options.workers, window=options.window,
            max_window=options.max_window, token=token,
            legacy=not options.no_legacy and token is None,
            ack_timeout=options.ack_timeout, idle_timeout=options.idle_timeout,
            request_timeout=options.request_timeout, cache=cache, door=door_name(door))
        try:
            factory.prepare_worker()
            return Worker(listener, door, state, slot, ctx, master_pid).run()
        finally:
            factory.close()

    ready: Dict[str, object] = {
        "address": format_address(address), "pid": master_pid, "source": options.source,
        "shm_budget": options.shm_budget,
        "token_file": os.path.abspath(options.token_file) if options.token_file else None}
    master = Master(listener, state, index, pools, run_worker, ready, options.ready_file,
                    options.request_timeout)
    code = master.run()
    if options.unix and os.getpid() == master_pid:
        os.unlink(options.unix)
    return code
