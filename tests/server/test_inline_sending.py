"""A worker keeps sending a frame inline while it reads the next one (its
sender thread), and the pool memory of every frame sent inline is given
back once sent."""
import numpy as np

from psana_ipc.client import Client
from psana_ipc.server.sources.synthetic import expected

from conftest import pid_alive, worker_pids


def test_a_frame_goes_out_while_the_worker_reads_the_next(start_server):
    """jungfrau4M calib (16.8 MB) is several socket buffers: sent only between
    the source's reads, the first frame could not arrive whole before the
    second read (3 s of waiting) ended."""
    server = start_server(["--workers", "2", "--cost-ms", "3000", "--cost-kind", "wait"])
    with Client(server.address, transport="inline") as reader, \
            Client(server.address) as watcher:
        assert reader.worker != watcher.worker
        frames = reader.frames(reader.submit("x", 1, "jungfrau4M", [1, 2], "calib"))
        first = next(frames)
        assert watcher.stats()["events"] == 1, "the second read is still going on"
        assert np.array_equal(first.array, expected("jungfrau4M", "calib", 1))
        second = next(frames)
        assert np.array_equal(second.array, expected("jungfrau4M", "calib", 2))


def test_frames_sent_inline_give_their_memory_back(start_server):
    server = start_server(["--workers", "2", "--cost-ms", "20", "--cost-kind", "wait"])
    with Client(server.address, transport="inline") as c:
        frames = c.get_many("x", 1, "jungfrau4M", range(12), "raw")
        stats = c.stats()
    assert all(np.array_equal(f, expected("jungfrau4M", "raw", e)) for e, f in enumerate(frames))
    assert stats["shm_peak_bytes"] > 0 and stats["shm_bytes"] == 0 and stats["frames_held"] == 0
    assert all(pid_alive(pid) for pid in worker_pids(server.pid))
