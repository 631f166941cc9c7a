"""The pool under crashes, freezes and hostile clients, with real server
processes: what a client holds never changes, whatever its worker does; a
closed connection leaves no pin behind; a worker frozen holding the index's
lock is the only one replaced and never blocks the master; no client
action crashes a worker."""
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from psana_ipc.client import Client
from psana_ipc.client.batch_ring import PoolBuffer
from psana_ipc.server.sources.synthetic import expected

from conftest import pid_alive, worker_pids
from faulty_source.probes import wait_for

MB = 1 << 20


def _raw(event: int) -> np.ndarray:
    return expected("epix100", "raw", event)


def _client_on(address: str, worker: int) -> Client:
    """A connection the given worker serves (the server balances connections
    over its workers: a few tries find it)."""
    extra = []
    for _ in range(20):
        client = Client(address).connect()
        if client.worker == worker:
            for other in extra:
                other.close()
            return client
        extra.append(client)
    raise AssertionError(f"no connection landed on worker {worker}")


def _replaced(server, dead: int) -> None:
    wait_for(lambda: len(worker_pids(server.pid)) == 2 and dead not in worker_pids(server.pid),
             "the dead worker replaced")


@pytest.mark.parametrize("cache", [True, False], ids=["cache entries", "frames of their own"])
def test_frames_a_client_holds_never_change_after_their_worker_dies(start_server, cache):
    """Held views stay byte-identical while the worker that served them is
    killed and other clients churn through the pool (evicting the cache)."""
    args = ["--workers", "2", "--shm-budget", "24M"] + (["--frame-cache", "12M"] if cache else [])
    server = start_server(args)
    victim = worker_pids(server.pid)[0]
    holder = _client_on(server.address, victim)
    held = [holder.view("x", 1, "epix100", e, "raw") for e in range(4)]
    os.kill(victim, signal.SIGKILL)
    _replaced(server, victim)
    with Client(server.address) as churn:
        for _ in range(3):
            churn.get_many("x", 1, "epix100", range(10, 40), "raw")
        if cache:
            assert churn.stats()["frame_cache"]["evictions"] > 0
    for event, frame in enumerate(held):
        assert np.array_equal(frame.array, _raw(event)), f"held frame {event} changed"
        frame.release()
    holder.close()


def test_a_closed_inline_connection_leaves_no_entry_pinned(start_server):
    """8 cached frames of 8.65 MB sent inline and never read (more than the
    socket's buffers take): pinned until sent, unpinned when the connection
    closes, and served again as hits."""
    server = start_server(["--workers", "1", "--frame-cache", "128M"])
    with Client(server.address) as c:
        c.get_many("x", 1, "epix10k2M", range(8))             # cached
        hits = c.stats()["frame_cache"]["hits"]
    inline = Client(server.address, transport="inline", window=8)
    inline.submit("x", 1, "epix10k2M", range(8))               # sent, never read
    with Client(server.address) as c:
        wait_for(lambda: c.stats()["frame_cache"]["hits"] == hits + 8, "the 8 frames sent")
        assert c.stats()["frame_cache"]["pinned"] > 0           # until they are sent
        inline.close()
        wait_for(lambda: c.stats()["frame_cache"]["pinned"] == 0, "no entry pinned")
        assert np.array_equal(c.get_many("x", 1, "epix10k2M", range(8)),
                              np.stack([expected("epix10k2M", "calib", e) for e in range(8)]))
        assert c.stats()["frame_cache"]["hits"] == hits + 16


def _holds_index_lock(pid: int) -> bool:
    """Whether a process holds a POSIX record lock (the pool index's: the
    server's other locks are flock and open-file-description ones)."""
    return any(re.search(rf"\bPOSIX\s+ADVISORY\s+WRITE\s+{pid}\b", line)
               for line in Path("/proc/locks").read_text().splitlines())


def _freeze_holding_the_lock(pid: int, tries: int = 20000) -> bool:
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        if _holds_index_lock(pid):
            return True
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.0005)
    return False


def test_a_worker_frozen_holding_the_index_lock_is_the_only_one_replaced(start_server):
    """Frozen while holding the lock, with the other worker then killed: the
    master keeps supervising (never waits on the lock), replaces the dead
    worker and the frozen one, and serving goes on within seconds, not
    --request-timeout."""
    server = start_server(["--workers", "2", "--frame-cache", "32M", "--request-timeout", "600"])
    frozen, other = worker_pids(server.pid)
    busy = _client_on(server.address, frozen)
    stop = threading.Event()

    def hammer() -> None:
        event = 0
        while not stop.is_set():
            try:
                busy.get("x", 1, "epix100", event % 16, "raw")
            except (ConnectionError, OSError):
                return
            event += 1
    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        assert _freeze_holding_the_lock(frozen), "never caught the worker holding the lock"
        os.kill(other, signal.SIGKILL)
        started = time.monotonic()
        wait_for(lambda: not pid_alive(frozen) and not pid_alive(other)
                 and len(worker_pids(server.pid)) == 2, "both workers replaced", timeout=30)
        replaced_after = time.monotonic() - started
        with Client(server.address) as c:
            assert np.array_equal(c.get("x", 1, "epix100", 20, "raw"), _raw(20))
    finally:
        stop.set()
        if pid_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
        thread.join(10)
        busy.close()
    assert replaced_after < 20, replaced_after
    log = server.log()
    assert f"worker {frozen} held the pool's lock" in log
    assert "made no progress" not in log
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10


def test_no_client_action_on_its_memory_crashes_a_worker(start_server):
    """A client that truncates (or tries to) the memory it was given: the
    pool is sealed, the worker writing into it goes on, and another group's
    client on the same worker is served."""
    server = start_server(["--workers", "1"])
    [worker] = worker_pids(server.pid)
    with Client(server.address) as hostile, Client(server.address) as other:
        buffer = PoolBuffer(hostile, hostile.make_arena(4 * MB), 4 * MB, pinned=False)
        fds = [hostile.pools.fds[0]]
        for name in os.listdir(f"/proc/{worker}/fd"):
            try:
                target = os.readlink(f"/proc/{worker}/fd/{name}")
            except OSError:
                continue
            if target.startswith("/memfd:psana-ipc-pool"):
                fds.append(os.open(f"/proc/{worker}/fd/{name}", os.O_RDWR))
        assert len(fds) >= 2
        for fd in fds:
            for size in (0, 4096):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
        into = buffer.into(0, 2, (704, 768), np.dtype("<u2"))
        frames = hostile.submit("x", 1, "epix100", [1, 2], "raw", into=into)
        assert len(list(hostile.replies(frames))) == 1
        assert np.array_equal(buffer.bytes[:2 * 704 * 768 * 2].view("<u2").reshape(2, 704, 768),
                              np.stack([_raw(1), _raw(2)]))
        assert np.array_equal(other.get("x", 1, "epix100", 3, "raw"), _raw(3))
        buffer.close()
        for fd in fds[1:]:
            os.close(fd)
    assert worker_pids(server.pid) == [worker]
