"""Fixtures shared by every test: real servers on loopback and a guard that
fails any test leaving shared memory behind."""
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple

import pytest

from psana_ipc.protocol.shm_names import parse_lock_name, parse_segment_name
from psana_ipc.client import server_process
from psana_ipc.client.server_process import child_pids

pytest_plugins = ["psana2_helpers", "live_helpers"]   # psana2 runs, written once per session

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
WATCH_EVERY = 0.25     # seconds between looks at what the suite's processes map


def _mapped_shm(pid: int) -> Set[str]:
    """Names in /dev/shm a process maps (MPI's files, btx's segments)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return set()
    if b"/dev/shm/" not in maps:       # most processes: no lines to split (torch maps thousands)
        return set()
    return {line.split("/dev/shm/", 1)[1].split(" ")[0]
            for line in maps.decode(errors="replace").splitlines() if "/dev/shm/" in line}


class OurProcesses:
    """Every process this test session started, and the /dev/shm files they
    mapped, watched from a thread: shared memory named with one of these pids
    (`psipc_<server pid>_...`) or mapped by one is the suite's; anything else
    in /dev/shm belongs to someone else on the node and is never looked at."""

    def __init__(self) -> None:
        self.pids: Set[int] = {os.getpid()}
        self.mapped: Set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shm-owners", daemon=True)

    def start(self) -> "OurProcesses":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, pid: int) -> None:
        self.pids.add(pid)

    def scan(self) -> None:
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            self.pids.add(pid)
            self.mapped |= _mapped_shm(pid)
            todo.extend(child_pids(pid))

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            self.scan()

    def owns(self, name: str) -> bool:
        parsed = parse_segment_name(name)
        if parsed is not None:
            return parsed.server_pid in self.pids
        lock = parse_lock_name(name)
        if lock is not None:
            return lock in self.pids
        return name in self.mapped


OURS = OurProcesses()


class ShmGuard:
    """What the suite's own processes added to /dev/shm between `before` and `leaked`."""

    def __init__(self, ours: OurProcesses) -> None:
        self.ours = ours
        self.before = set(os.listdir(SHM))

    def new_entries(self) -> Set[str]:
        self.ours.scan()
        return {n for n in set(os.listdir(SHM)) - self.before if self.ours.owns(n)}

    def leaked(self, grace: float = 5.0) -> Set[str]:
        """Ours left after a short grace for servers still unlinking; removed, so
        the next test starts clean."""
        return removed_after(self.new_entries, grace)


def removed_after(find: Callable[[], Set[str]], grace: float) -> Set[str]:
    """Names in /dev/shm `find` still gives after up to `grace` seconds (for
    servers still unlinking), removed so what comes next starts clean."""
    deadline = time.monotonic() + grace
    while True:
        left = find()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in left:
        (SHM / name).unlink(missing_ok=True)
    return left


FOLDERS = ("unit", "server", "client", "sources", "compat", "ops")


@pytest.hookimpl(tryfirst=True)     # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items) -> None:
    """Mark each test with its folder (`pytest -m unit`, `-m "not sources"`),
    and keep a module's tests on one process of a parallel run (`-n`), where
    they share the module's servers; the SLURM tests share one process too,
    as they share the one SLURM the session starts."""
    tests = Path(__file__).parent
    for item in items:
        if not item.path.is_relative_to(tests):
            continue
        where = item.path.relative_to(tests)
        if where.parts[0] in FOLDERS:
            item.add_marker(where.parts[0])
        group = "slurm" if item.get_closest_marker("slurm") else where.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_sessionstart(session) -> None:
    OURS.start()


def pytest_collection_finish(session) -> None:
    """Freeze what collection made (torch, hypothesis, every test module): the
    collector no longer walks it, in this process nor in the DataLoader workers
    and other children forked from it, whose walks would also copy its pages."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session) -> None:
    OURS.stop()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail a test whose processes leave shared memory in /dev/shm."""
    guard = ShmGuard(OURS)
    yield
    leaked = guard.leaked()
    assert not leaked, f"test left shared memory behind: {sorted(leaked)}"


class ServerProcess(server_process.ServerProcess):
    """An iserver subprocess with its ready file and log in `tmp`; `stop` fails a
    test whose server ignores the signal."""

    def __init__(self, args: List[str], tmp: Path, python: Optional[str] = None,
                 env: Optional[dict] = None, timeout: float = 60.0) -> None:
        ready_file = tmp / f"ready-{time.monotonic_ns()}.json"
        super().__init__(args, python=python, ready_file=ready_file, env=env,
                         log_file=ready_file.with_suffix(".log"), timeout=timeout)
        OURS.add(self.pid)

    @property
    def workers(self) -> List[int]:
        return worker_pids(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        try:
            return super().stop(sig, timeout)
        except TimeoutError as e:
            raise AssertionError(str(e)) from None


def _mapped_at(array) -> Tuple[str, int]:
    """The /proc/self/maps line of an array's (or tensor's) memory, and the
    array's offset in what is mapped there."""
    import numpy as np
    address = np.asarray(array).__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return line, address - start + int(line.split()[2], 16)
    return "", 0


def in_pool(array) -> bool:
    """Whether an array's memory is a server's pool (a memfd mapped in this
    process), not this process's own: a batch written in place."""
    return "/memfd:psana-ipc-pool" in _mapped_at(array)[0]


def pool_place(array) -> Tuple[int, int]:
    """(inode, offset) of an array's memory in the file it is mapped from:
    which extent of which pool it is."""
    line, offset = _mapped_at(array)
    return int(line.split()[4]), offset


def worker_pids(parent: int) -> List[int]:
    """Live children of a process."""
    return [pid for pid in child_pids(parent) if pid_alive(pid)]


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _servers(tmp: Path) -> Iterator[Callable[..., ServerProcess]]:
    """`start(args, python=..., env=...)` for servers with their files in `tmp`;
    each must exit 0 on SIGTERM at the end unless its test already stopped it."""
    started = []

    def start(args: List[str] = (), **kw) -> ServerProcess:
        server = ServerProcess(list(args), tmp, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            code = server.stop()
            assert code == 0, f"server exited {code} on SIGTERM:\n{server.log()}"
    left = _left_in_shm({server.pid for server in started})
    assert not left, f"stopped servers left shared memory behind: {sorted(left)}"


def _left_in_shm(pids: Set[int], grace: float = 5.0) -> Set[str]:
    """Names in /dev/shm of these (stopped) servers, after a short grace for
    their last unlinks; removed. The per-test guard cannot see what a server
    a module's tests share made before the first of them began."""
    def theirs() -> Set[str]:
        return {name for name in os.listdir(SHM) if _server_of(name) in pids}
    return removed_after(theirs, grace)


def _server_of(name: str) -> Optional[int]:
    """The server pid a segment's or lock's name in /dev/shm carries, if any."""
    segment = parse_segment_name(name)
    return segment.server_pid if segment is not None else parse_lock_name(name)


@pytest.fixture
def start_server(tmp_path):
    """Start a test's servers with `start_server(args, python=..., env=...)`."""
    yield from _servers(tmp_path)


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory):
    """`start_server` for the servers a module's tests share (read-only use:
    tests that change a server's state start their own)."""
    yield from _servers(tmp_path_factory.mktemp("servers"))


@pytest.fixture
def server(start_server):
    """A synthetic-source server with two workers."""
    return start_server(["--workers", "2"])


@pytest.fixture(scope="module")
def shared_server(start_module_server):
    """`server`, shared by a module's tests that only read from it: a test that
    counts what a server did, holds or releases frames, or stops it has its own."""
    return start_module_server(["--workers", "2"])


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM for the session's SLURM tests (tests/slurm/start_slurm.sh;
    needs root: it installs and runs the daemons), stopped after them; a failure
    to start fails the tests with the set-up's output."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start slurmctld and slurmd and must run as root")
    setup = ROOT / "tests" / "slurm"
    started = subprocess.run(["bash", str(setup / "start_slurm.sh")], capture_output=True,
                             text=True, timeout=900)
    try:
        if started.returncode != 0:
            pytest.fail(f"SLURM did not start:\n{started.stdout}\n{started.stderr}")
        yield
    finally:
        subprocess.run(["bash", str(setup / "stop_slurm.sh")], timeout=120)


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Tuple[Path, str]:
    """This project built once as pip builds it, for the tests that look into the
    wheel or install it: (the wheel, pip's verbose output). It builds a copy, as
    setuptools writes build/ beside the sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "*.egg-info", "__pycache__", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-v",
                            "-w", str(tmp)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp.glob("psana_ipc-*.whl")
    return wheel, built.stdout + built.stderr


def psana_ipc(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The `psana-ipc` command line with `args`, run as a user would run it."""
    return subprocess.run([sys.executable, "-m", "psana_ipc.client.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def server_stats(server: ServerProcess) -> dict:
    """A server's `stats`, asked on a connection of its own (inline: it maps nothing)."""
    from psana_ipc.client import Client
    with Client(server.address, transport="inline") as c:
        return c.stats()


def run_bench(tmp_path: Path, *args: str) -> Tuple[subprocess.CompletedProcess, Any]:
    """scripts/bench.py with `args` and --json: its run, and what it wrote (None if it failed)."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args,
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    return done, json.loads(out.read_text()) if done.returncode == 0 else None
