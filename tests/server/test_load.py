"""Load: many connections of both dialects at once, every byte checked, and
nothing (segments, budget, descriptors) left behind; and `psana-ipc stats`
moving as the load it reports on."""
import json
import threading
from functools import lru_cache

import numpy as np
import pytest

from psana_ipc.client import Client, ServerError, legacy
from psana_ipc.protocol import errors
from psana_ipc.protocol.address import parse_address
from psana_ipc.server.frame_memory import extent_size
from psana_ipc.server.sources.synthetic import expected

from conftest import psana_ipc
from faulty_source.probes import open_fds, record_figure, wait_for

V1_CLIENTS = 48
LEGACY_CLIENTS = 16
REQUESTS = 20
# (detector, mode): small frames, so 2 cores get through it in seconds
KINDS = [("epix100", "raw"), ("opal", "raw"), ("epix100", "calib")]
BUDGET = 256 << 20


@lru_cache(maxsize=None)
def _reference(det, mode, event):
    return expected(det, mode, event)


def _request(k, n):
    det, mode = KINDS[(k + n) % len(KINDS)]
    return det, mode, (7 * k + n) % 50


def test_64_connections_of_both_dialects(start_server, pytestconfig):
    server = start_server(["--workers", "2", "--shm-budget", str(BUDGET)])
    address = parse_address(server.address)
    watcher = Client(server.address, transport="inline")
    watcher.ping()
    fds_before = {pid: open_fds(pid) for pid in server.workers}
    started = threading.Barrier(V1_CLIENTS + 1)
    finished = threading.Barrier(V1_CLIENTS + 1)
    failures = []
    done = []          # one entry per client whose requests are over

    def v1_client(k):
        try:
            with Client(server.address, window=2) as c:
                c.ping()
                started.wait()
                for n in range(REQUESTS):
                    det, mode, event = _request(k, n)
                    if n % 4 == 3:      # every fourth request is a pipelined batch
                        got = c.get_many("x", 1, det, [event, event + 1], mode)
                        ok = all(np.array_equal(g, _reference(det, mode, e))
                                 for g, e in zip(got, (event, event + 1)))
                    else:
                        ok = np.array_equal(c.get("x", 1, det, event, mode),
                                            _reference(det, mode, event))
                    if not ok:
                        failures.append(f"v1 client {k}: wrong bytes for {det} {mode} {event}")
                done.append(k)
                finished.wait()            # connected until every client is through
        except Exception as e:
            failures.append(f"v1 client {k}: {e!r}")
            done.append(k)
            started.abort()
            finished.abort()

    def legacy_client(k):
        try:
            for n in range(REQUESTS):
                det, mode, event = _request(k, n)
                got = legacy.fetch(address, "x", 1, "idx", det, event, mode)
                if not np.array_equal(got, _reference(det, mode, event)):
                    failures.append(f"legacy client {k}: wrong bytes for {det} {mode} {event}")
        except Exception as e:
            failures.append(f"legacy client {k}: {e!r}")
        done.append(k)

    threads = [threading.Thread(target=v1_client, args=(k,)) for k in range(V1_CLIENTS)]
    threads += [threading.Thread(target=legacy_client, args=(k,)) for k in range(LEGACY_CLIENTS)]
    for t in threads:
        t.start()
    held = peak = 0
    try:
        started.wait()
        held = watcher.stats()["connections"]       # every v1 client is connected now
        while len(done) < len(threads):
            peak = max(peak, watcher.stats()["connections"])
        finished.wait()
    except threading.BrokenBarrierError:
        pass                                        # a client failed: it says why below
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert held >= V1_CLIENTS + 1
    stats = watcher.stats()
    served = V1_CLIENTS * (REQUESTS + REQUESTS // 4) + LEGACY_CLIENTS * REQUESTS
    assert stats["events"] == served and stats["errors"] == {}
    assert 0 < stats["shm_peak_bytes"] <= BUDGET
    wait_for(lambda: watcher.stats()["connections"] == 1, "every client connection is closed")
    after = watcher.stats()
    assert after["shm_bytes"] == 0 and after["frames_held"] == 0
    assert {pid: open_fds(pid) for pid in server.workers} == fds_before
    record_figure(pytestconfig, f"load: {V1_CLIENTS} v1 + {LEGACY_CLIENTS} legacy clients, up to "
                                f"{peak} connections at once (the stats watcher included), "
                                f"{served} frames checked byte for byte, shm peak "
                                f"{stats['shm_peak_bytes'] >> 20} MiB of a {BUDGET >> 20} MiB "
                                f"budget, 0 errors")
    watcher.close()


def _cli_stats(server):
    result = psana_ipc("stats", "--json", "--address", server.address)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_stats_fields_move_with_what_the_server_does(start_server):
    server = start_server(["--workers", "1"])
    frame = 704 * 768 * 2                                  # epix100 raw
    start = _cli_stats(server)
    assert (start["events"], start["bytes"], start["errors"], start["frames_held"],
            start["shm_bytes"]) == (0, 0, {}, 0, 0)
    c = Client(server.address)
    with c.view("x", 1, "epix100", 1, "raw"):
        holding = _cli_stats(server)
        assert holding["frames_held"] == 1 and holding["shm_bytes"] == extent_size(frame)
        assert holding["events"] == 1 and holding["bytes"] == frame
    c.get_many("x", 1, "epix100", [2, 3], "raw")
    with pytest.raises(ServerError):
        c.get("x", 1, "nope", 1, "raw")
    with pytest.raises(ServerError):
        c.get("x", 1, "epix100", 10**6, "raw")
    later = _cli_stats(server)
    assert later["events"] == 3 and later["bytes"] == 3 * frame
    assert later["frames_held"] == 0 and later["shm_bytes"] == later["kept_bytes"]
    assert later["errors"] == {errors.UNKNOWN_DETECTOR: 1, errors.OUT_OF_RANGE: 1}
    assert later["shm_peak_bytes"] >= later["shm_bytes"] and later["connections"] == 2
    c.close()
    wait_for(lambda: _cli_stats(server)["shm_bytes"] == 0, "the closed client's frames go")
    end = _cli_stats(server)
    assert end["frames_held"] == 0 and end["events"] == 3 and end["connections"] == 1
