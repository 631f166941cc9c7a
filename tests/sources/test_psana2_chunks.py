"""Runs split into chunk files, as the DAQ splits long runs: random access
by index must give what psana's own sequential read gives, and a corrupt
record must be an error reply that leaves the worker serving and nothing in
/dev/shm, although psana itself dies on it."""
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from psana2_helpers import (CHUNK_EVENTS, CHUNKED_EVENTS, CHUNKED_RUN, CORRUPT_EVENT,
                            CORRUPT_EVENTS, CORRUPT_RUN, DETECTORS, EXP, ROOT, psana_python,
                            run_psana)
from psana_ipc.client import Client
from psana_ipc.protocol.errors import READ_FAILED, ServerError
from psana_ipc.server.sources.synthetic import expected, timestamp_of

pytestmark = pytest.mark.psana2


def chunked_server(start_server, data_dir: Path, workers: int = 1):
    return start_server(["--source", "psana2", "--workers", str(workers), "--offline",
                         "--data-dir", str(data_dir)], python=psana_python())


def mpi_segments(pid: int) -> list:
    return sorted(p.name for p in Path("/dev/shm").glob(f"mpich_shm_{pid:x}_*"))


def test_every_event_of_chunked_streams_is_psanas_sequential_read(start_server, psana2_chunked,
                                                                  tmp_path):
    for stream in range(len(DETECTORS)):
        assert len(psana2_chunked.chunks(CHUNKED_RUN, stream)) == -(-CHUNKED_EVENTS // CHUNK_EVENTS)
    out = tmp_path / "sequential.npz"
    run_psana([str(ROOT / "tests" / "psana2_sequential_oracle.py"), str(psana2_chunked.data_dir),
               EXP, str(CHUNKED_RUN), ",".join(DETECTORS), str(out)])
    reference = np.load(out)
    assert len(reference["timestamps"]) == CHUNKED_EVENTS
    server = chunked_server(start_server, psana2_chunked.data_dir)
    order = list(range(CHUNKED_EVENTS))
    random.Random(11).shuffle(order)
    with Client(server.address) as c:
        for event in order + order[::-1]:
            for detector in DETECTORS:
                raw, desc = c.get_frame(EXP, CHUNKED_RUN, detector, event, mode="raw")
                assert desc["timestamp"] == {"time": int(reference["timestamps"][event])}
                assert raw.tobytes() == reference[detector][event].tobytes(), \
                    f"{detector} event {event}"
                np.testing.assert_array_equal(raw, expected(detector, "raw", event))
                assert desc["timestamp"]["time"] == timestamp_of(event)
        assert all(c.info(EXP, CHUNKED_RUN, d)["events"] == CHUNKED_EVENTS for d in DETECTORS)


def test_psana_itself_dies_on_the_corrupt_record(psana2_chunked, tmp_path):
    """The damaged chunk is of the kind that kills a reader inside psana."""
    proc = subprocess.Popen([psana_python(), str(ROOT / "tests" / "psana2_sequential_oracle.py"),
                             str(psana2_chunked.data_dir), EXP, str(CORRUPT_RUN), "epix10k2M",
                             str(tmp_path / "never.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=300)
    for name in mpi_segments(proc.pid):    # what the dead reader left
        (Path("/dev/shm") / name).unlink()
    assert proc.returncode == -signal.SIGABRT, output
    assert "corrupt xtc" in output


def test_a_corrupt_record_is_an_error_reply_and_the_worker_serves_on(start_server, psana2_chunked):
    server = chunked_server(start_server, psana2_chunked.data_dir)
    with Client(server.address) as c:
        for event in (0, CORRUPT_EVENT, 1, CORRUPT_EVENT, CORRUPT_EVENTS - 1, 2):
            if event == CORRUPT_EVENT:
                with pytest.raises(ServerError) as e:
                    c.get(EXP, CORRUPT_RUN, "epix10k2M", event, mode="raw")
                assert e.value.code == READ_FAILED
                assert f"event {event}" in e.value.message and "corrupt" in e.value.message
            else:
                np.testing.assert_array_equal(c.get(EXP, CORRUPT_RUN, "epix10k2M", event,
                                                    mode="raw"),
                                              expected("epix10k2M", "raw", event))
    assert len(server.workers) == 1


def test_a_worker_killed_inside_psana_leaves_no_mpi_segment(start_server, psana2_chunked):
    server = chunked_server(start_server, psana2_chunked.data_dir)
    with Client(server.address) as c:
        c.get(EXP, CHUNKED_RUN, "epix10k2M", 0, mode="raw")   # psana imported, MPI started
    (worker,) = server.workers
    assert not mpi_segments(worker), "the segment's name is removed once MPI has started"
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker in server.workers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker not in server.workers
    assert not mpi_segments(worker)
