"""The v1 dialect end to end: a real server on loopback, the real client."""
import numpy as np
import pytest

from psana_ipc.client import Client, ServerError
from psana_ipc.protocol import errors
from psana_ipc.protocol.messages import Release
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected, timestamp_of


@pytest.mark.parametrize("mode", ["raw", "calib", "image", "mask"])
def test_get_returns_the_documented_bytes(shared_server, mode):
    with Client(shared_server.address) as c:
        for det in ("epix10k2M", "jungfrau4M", "rayonix"):
            frame = c.get("xpptut15", 14, det, 17, mode)
            ref = expected(det, mode, 17)
            assert frame.dtype == ref.dtype and np.array_equal(frame, ref)


def test_descriptor_carries_timestamp_and_calibration(shared_server):
    with Client(shared_server.address) as c:
        _, desc = c.get_frame("x", 1, "epix10k2M", 42, "raw")
        assert desc["timestamp"] == {"time": timestamp_of(42)}
        assert desc["calibrated"] is True and desc["event"] == 42


def test_get_many_keeps_request_order_with_repeats(shared_server):
    events = [9, 0, 9, 3, 999]
    with Client(shared_server.address) as c:
        batch = c.get_many("x", 1, "jungfrau4M", events, "raw")
    assert batch.shape == (5, 8, 512, 1024)
    for k, e in enumerate(events):
        assert np.array_equal(batch[k], expected("jungfrau4M", "raw", e))


def test_inline_transport_gives_the_same_bytes(shared_server):
    with Client(shared_server.address, transport="inline") as c:
        batch = c.get_many("x", 1, "epix10k2M", [1, 2], "calib")
        assert c.server.transport == "inline"
    assert np.array_equal(batch[1], expected("epix10k2M", "calib", 2))


def test_views_hold_frames_until_released(start_server):
    server = start_server(["--workers", "1", "--window", "3"])
    with Client(server.address) as c:
        frames = [c.view("x", 1, "epix100", e, "raw") for e in range(3)]
        assert c.stats()["frames_held"] == 3
        for e, f in enumerate(frames):
            assert np.array_equal(f.array, expected("epix100", "raw", e))
            assert not f.array.flags.writeable
            f.release()
        assert c.stats()["frames_held"] == 0
        # memory is reused: a new frame lands where an earlier one was
        with c.view("x", 1, "epix100", 5, "raw") as again:
            assert again.reply.where.offset in {f.reply.where.offset for f in frames}


def test_pipelined_requests_are_answered_by_id(shared_server):
    with Client(shared_server.address) as c:
        first = c.submit("x", 1, "epix100", [1, 2, 3], "raw")
        second = c.submit("x", 1, "epix100", [4], "calib")
        info = c.info("x", 1, "epix100")
        assert info["events"] == 1000
        [only] = [np.array(f.array) for f in _released(c.frames(second))]
        got = [np.array(f.array) for f in _released(c.frames(first))]
    assert np.array_equal(only, expected("epix100", "calib", 4))
    assert all(np.array_equal(g, expected("epix100", "raw", e)) for g, e in zip(got, [1, 2, 3]))


def _released(frames):
    for f in frames:
        with f:
            yield f


def test_info_lists_detectors_and_modes(shared_server):
    with Client(shared_server.address) as c:
        run = c.info("xpptut15", 14)
        assert {"epix10k2M", "jungfrau4M", "rayonix"} <= set(run["detectors"])
        assert run["detectors"]["epix10k2M"]["events"] == 1000
        det = c.info("xpptut15", 14, "jungfrau4M")
    assert det["events"] == 1000
    assert det["modes"]["raw"] == {"shape": [8, 512, 1024], "dtype": "uint16", "calibrated": True}
    assert det["modes"]["image"]["shape"] == list(expected("jungfrau4M", "image", 0).shape)


def test_every_event_is_present_where_sources_have_no_rates(shared_server):
    with Client(shared_server.address) as c:
        assert c.info("x", 1, "epix100", present=True)["present"] == [[0, 1000, 1]]
        found = c.info("x", 1, present=True)["detectors"]
        assert found["rayonix"]["present"] == [[0, 1000, 1]]
        assert "present" not in c.info("x", 1)["detectors"]["rayonix"]
        assert c.events_with("x", 1, "epix100") == list(range(1000))


@pytest.mark.parametrize("call, code", [
    (lambda c: c.get("x", 1, "nonexistent", 0), errors.UNKNOWN_DETECTOR),
    (lambda c: c.get("x", 1, "epix100", 1000), errors.OUT_OF_RANGE),
    (lambda c: c.get("x", 1, "epix100", 0, "fancy"), errors.UNKNOWN_MODE),
    (lambda c: c.get_many("x", 1, "epix100", [0, 5000, 1]), errors.OUT_OF_RANGE),
    (lambda c: c.call(Release((12345,))), errors.BAD_SLOT),
    (lambda c: c.get("x", 1, "epix100", 0, fields=["opal.x"]), errors.BAD_REQUEST),
])
def test_errors_are_replies_and_the_connection_goes_on(server, call, code):
    with Client(server.address) as c:
        with pytest.raises(ServerError) as e:
            call(c)
        assert e.value.code == code and e.value.message
        assert np.array_equal(c.get("x", 1, "epix100", 3, "raw"), expected("epix100", "raw", 3))
        assert c.stats()["frames_held"] == 0


def test_stats_count_events_bytes_and_errors(server):
    with Client(server.address) as c:
        c.get_many("x", 1, "epix100", [0, 1], "raw")
        with pytest.raises(ServerError):
            c.get("x", 1, "epix100", 10**6)
        stats = c.stats()
    assert stats["events"] >= 2 and stats["bytes"] >= 2 * 704 * 768 * 2
    assert stats["errors"].get("out_of_range") == 1
    assert stats["shm_bytes"] <= stats["shm_budget"] and stats["workers"] == 2


def test_a_forked_child_gets_its_own_connection(shared_server):
    import os
    c = Client(shared_server.address)
    assert c.ping()
    pid = os.fork()
    if pid == 0:
        ok = np.array_equal(c.get("x", 1, "epix100", 8, "raw"), expected("epix100", "raw", 8))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert np.array_equal(c.get("x", 1, "epix100", 9, "raw"), expected("epix100", "raw", 9))
    c.close()


def test_a_forked_child_leaves_its_parents_holds_alone(shared_server):
    """A child closes the holds it inherited, whose descriptors are its
    parent's too, without unlocking them; its own frames' holds are its own.
    The parent's frame here is held through a descriptor an earlier hold
    left for reuse."""
    import os
    with Client(shared_server.address) as c:
        with c.view("x", 1, "epix100", 3, "raw"):
            pass
        frame = c.view("x", 1, "epix100", 4, "raw")
        where = frame.reply.where
        pid = os.fork()
        if pid == 0:
            with c.view("x", 1, "epix100", 5, "raw") as own:
                ok = np.array_equal(own.array, expected("epix100", "raw", 5))
            os._exit(0 if ok else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert c.pools.held_elsewhere(where.pool, where.offset, where.size)
        assert np.array_equal(frame.array, expected("epix100", "raw", 4))
        frame.release()
        assert not c.pools.held_elsewhere(where.pool, where.offset, where.size)


def test_unix_socket_server(start_server, tmp_path):
    path = tmp_path / "iserver.sock"
    server = start_server(["--unix", str(path), "--workers", "1"])
    assert server.address == f"unix:{path}"
    assert path.stat().st_mode & 0o077 == 0       # owner-only
    with Client(str(path)) as c:
        assert np.array_equal(c.get("x", 1, "opal", 2, "raw"), expected("opal", "raw", 2))
    assert server.stop() == 0
    assert not path.exists()


def test_frame_memory_has_no_name_anyone_could_open(shared_server):
    """Frames are in the server's pool, which has no name: nothing of the
    shared_server in /dev/shm but its lock file."""
    with Client(shared_server.address) as c, c.view("x", 1, "epix100", 0, "raw") as frame:
        assert np.array_equal(frame.array, expected("epix100", "raw", 0))
        assert not our_segments(shared_server.pid)
