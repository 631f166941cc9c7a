"""Batch buffers in the server's pool: the server's workers write every frame
of a batch in place, the client wraps the batch with no copy. Bytes, order,
the lifetime rule, what the server refuses, that
a group's buffers are reused by its next consumers instead of fresh memory,
and that nothing a client holds changes when the server stops or dies."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from psana_ipc.client import (BatchLoader, Client, IPCRemotePsanaDataset, RunDataset,
                              ServerError)
from psana_ipc.client.batch_ring import GroupBuffers
from psana_ipc.client.group import ConnectionGroup
from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.messages import FreeArenas, Into
from psana_ipc.protocol.pool import TICKET_BYTES
from psana_ipc.protocol.shm_names import lock_name, segment_path
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected

from conftest import ROOT, in_pool, pid_alive, pool_place, psana_ipc, server_stats
from faulty_source.probes import wait_for

FRAME = expected("epix100", "raw", 0)


def _check(batch, events, det="epix100", mode="raw"):
    batch = np.asarray(batch)
    assert len(batch) == len(events)
    for row, e in zip(batch, events):
        assert np.array_equal(row, expected(det, mode, e))


def test_batches_hold_the_bytes_in_order_and_are_the_pool_itself(server):
    events = [7, 3, 3, 11, 0, 5, 9]
    loader = BatchLoader(server.address, "x", 1, "jungfrau4M", "calib", events, batch_size=3)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert all(isinstance(b, torch.Tensor) and b.is_contiguous() for b in batches)
    assert all(in_pool(b) for b in batches)
    _check(torch.cat([b.clone() for b in batches]), events, "jungfrau4M", "calib")
    assert server_stats(server)["batch_buffers"] >= 3
    loader.close()
    del batches
    wait_for(lambda: server_stats(server)["batch_buffers"] == 0, "closing frees the buffers")


def test_shuffled_epochs_read_what_their_order_says(shared_server):
    loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(10), batch_size=4,
                         shuffle=True, seed=3, output="numpy")
    for epoch in range(2):
        loader.set_epoch(epoch)
        got = np.concatenate([b.copy() for b in loader])
        _check(got, loader._order())
    loader.close()


@pytest.mark.parametrize("buffers,depth", [(2, 2), (1, 3), (3, 1)])
def test_the_last_buffers_batches_stay_intact_and_memory_is_reused(server, buffers, depth):
    """A dropped batch stays intact until `buffers` further batches have been
    drawn, across epochs too; the loader then reuses its memory."""
    events = list(range(14))
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", events, batch_size=2,
                         buffers=buffers, depth=depth, output="numpy")
    held, places = [], set()
    for epoch in range(2):
        for k, batch in enumerate(loader):
            places.add(pool_place(batch))
            held = (held + [(batch, events[2 * k:2 * k + 2])])[-buffers:]
            for old, evs in held:
                _check(old, evs)
            del batch
    assert len(places) <= buffers + depth + 1, places
    loader.close()


def test_a_batch_kept_is_never_overwritten(shared_server):
    """Code that keeps every batch (btx appends them all) stays correct: the
    loader's buffers grow instead."""
    loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(12), batch_size=2,
                         output="numpy")
    kept = [b for _ in range(2) for b in loader]
    for k, batch in enumerate(kept):
        _check(batch, [2 * (k % 6), 2 * (k % 6) + 1])
    loader.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_are_pinned_and_go_to_the_gpu_as_written(shared_server):
    loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(4), batch_size=2)
    for k, batch in enumerate(loader):
        assert batch.is_pinned()
        on_gpu = batch.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        _check(on_gpu.cpu(), [2 * k, 2 * k + 1])
    loader.close()


@pytest.fixture
def buffer(server):
    """A client of the server with one batch buffer of room for two epix100 raw frames."""
    with Client(server.address) as client:
        made = client.make_arena(2 * FRAME.nbytes)
        yield client, made


def _into(ticket, offsets, shape=FRAME.shape, dtype=FRAME.dtype.str):
    return Into(ticket, tuple(offsets), tuple(shape), dtype)


def _get_into(client, into, events=(4,), **kw):
    rid = client.submit("x", 1, "epix100", list(events), "raw", into=into, **kw)
    return [reply for reply, _ in client.replies(rid)]


def _contents(client, made, frames=2):
    return client.pools.view(made.pool, made.offset, (frames,) + FRAME.shape, FRAME.dtype)


def test_a_group_member_writes_frames_at_their_offsets(server, buffer):
    owner, made = buffer
    with Client(server.address, group=owner.group) as member:
        replies = _get_into(member, _into(made.arena, [FRAME.nbytes, 0]), events=(4, 9))
    assert [f.event for f in replies[0].frames] == [4, 9]
    _check(_contents(owner, made), [9, 4])


def test_a_get_into_a_batch_buffer_skips_nothing(buffer):
    """A skipped event would leave a row of the batch unwritten: refused, the
    buffer left as it was."""
    client, made = buffer
    rid = client.submit("x", 1, "epix100", [4], "raw", into=_into(made.arena, [0]),
                        skip_incomplete=True)
    with pytest.raises(ServerError) as err:
        list(client.replies(rid))
    assert err.value.code == "bad_request"
    assert not _contents(client, made).any()
    with pytest.raises(ValueError, match="skip_incomplete"):
        BatchLoader(client.address, "x", 1, "epix100", "raw", range(4), arenas=True,
                    skip_incomplete=True)


def test_batches_are_copied_from_the_frame_cache_and_hints_still_go_out(start_server):
    server = start_server(["--workers", "2", "--frame-cache", "256M"])
    events = list(range(8))
    with Client(server.address) as c:
        c.prefetch("x", 1, "epix100", events, "raw")
        wait_for(lambda: c.stats()["frame_cache"]["read_ahead"] == len(events), "events read ahead")
        reads = c.stats()["events"]
        loader = BatchLoader(server.address, "x", 1, "epix100", "raw", events, batch_size=4,
                             output="numpy", read_ahead=0)
        got = [b.copy() for b in loader]
        _check(np.concatenate(got), events)
        stats = c.stats()
        assert stats["batch_buffers"] > 0
        assert stats["events"] == reads                       # no source read: cache hits
        assert stats["frame_cache"]["hits"] == len(events)
        assert stats["frame_cache"]["pinned"] == 0            # every hit unpinned again
        loader.close()
        more = list(range(8, 32))
        loader = BatchLoader(server.address, "x", 1, "epix100", "raw", more, batch_size=4,
                             output="numpy", depth=1, read_ahead=8)
        _check(np.concatenate([b.copy() for b in loader]), more)
        assert c.stats()["frame_cache"]["read_ahead"] > len(events)   # hinted from the loader
        loader.close()


@pytest.mark.parametrize("case,code_offsets,shape,dtype", [
    ("past the end", ["end"], FRAME.shape, FRAME.dtype.str),
    ("misaligned", [1], FRAME.shape, FRAME.dtype.str),
    ("wrong shape", [0], (4, 4), FRAME.dtype.str),
    ("wrong dtype", [0], FRAME.shape, "<u4"),
    ("object dtype", [0], FRAME.shape, "|O"),
    ("not a dtype", [0], FRAME.shape, "nonsense"),
    ("huge shape", [0], (2 ** 40, 2 ** 40), FRAME.dtype.str),
])
def test_a_bad_place_in_a_batch_buffer_is_refused_before_anything_is_written(
        buffer, case, code_offsets, shape, dtype):
    client, made = buffer
    if code_offsets == ["end"]:         # the last frame's room, two bytes too far
        code_offsets = [made.size - TICKET_BYTES - FRAME.nbytes + 2]
    with pytest.raises(ServerError) as err:
        _get_into(client, _into(made.arena, code_offsets, shape, dtype))
    assert err.value.code == "bad_arena", case
    assert not _contents(client, made).any()
    assert client.ping()                       # the connection goes on


def test_one_offset_per_event_and_no_negative_offsets(buffer):
    """Both are the request's own faults: a get that lacks offsets is answered
    as the server answers it; a negative offset is no place at all and cannot
    even be written down (the server parses it into the same refusal)."""
    client, made = buffer
    with pytest.raises(ServerError) as err:
        _get_into(client, _into(made.arena, [0]), events=(1, 2))
    assert err.value.code == "bad_arena"
    with pytest.raises(ProtocolError) as refused:
        _into(made.arena, [-8, 0])
    assert refused.value.code == "bad_arena"


def test_buffers_of_another_group_or_not_buffers_at_all_are_refused(server, buffer):
    owner, made = buffer
    with owner.view("x", 1, "epix100", 0, "raw") as frame:
        frame_ticket = frame.reply.where.ticket
    owner.flush_releases()
    with Client(server.address) as stranger:
        assert stranger.group != owner.group
        for ticket in (made.arena, frame_ticket, 12345, 0):
            with pytest.raises(ServerError) as err:
                _get_into(stranger, _into(ticket, [0]))
            assert err.value.code == "bad_arena", ticket
        with pytest.raises(ServerError) as err:
            stranger.call(FreeArenas((made.arena,)))
        assert err.value.code == "bad_arena"
    with pytest.raises(ServerError) as err:
        _get_into(owner, _into(frame_ticket, [0]))
    assert err.value.code == "bad_arena"
    assert not _contents(owner, made).any()


def test_a_group_id_the_server_did_not_issue_is_refused(server, buffer):
    owner, _ = buffer
    nonce, _, mac = owner.group.partition(".")
    forged = f"{nonce}.{'0' * len(mac)}" if mac != "0" * len(mac) else f"{nonce}.{'1' * len(mac)}"
    with pytest.raises(ServerError) as err:
        Client(server.address, group=forged).connect()
    assert err.value.code == "bad_arena"


def test_a_batch_buffer_needs_shared_memory(shared_server):
    with Client(shared_server.address, transport="inline") as client:
        with pytest.raises(ServerError) as err:
            client.make_arena(4096)
        assert err.value.code == "bad_arena"
        loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(4),
                             batch_size=2, transport="inline", output="numpy")
        _check(np.concatenate([b.copy() for b in loader]), range(4))   # copies instead
        loader.close()


def test_a_buffer_larger_than_the_budget_is_refused_and_the_loader_copies_instead(
        start_server):
    server = start_server(["--workers", "2", "--shm-budget", "4M"])
    with Client(server.address) as client:
        with pytest.raises(ServerError) as err:
            client.make_arena(8 << 20)
        assert err.value.code == "no_memory" and "a batch buffer" in err.value.message
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(6), batch_size=3,
                         output="numpy")
    with pytest.warns(UserWarning, match="no room for batch buffers"):
        got = np.concatenate([b.copy() for b in loader])
    _check(got, range(6))
    loader.close()


def test_making_a_buffer_without_waiting_fails_at_once_without_room(start_server):
    server = start_server(["--workers", "2", "--shm-budget", "8M"])
    with Client(server.address) as first, Client(server.address) as other:
        first.make_arena(4 << 20)
        with pytest.raises(ServerError) as err:
            other.make_arena(4 << 20, wait=False)
        assert err.value.code == "no_memory" and "a batch buffer" in err.value.message
        assert first.stats()["batch_buffers"] == 1


def test_buffers_asked_together_are_what_the_budget_has_room_for(start_server):
    """A new DataLoader worker asks for its buffers at once: it gets those
    there is room for; one that needs them all gets none, and what was made
    for it goes back."""
    server = start_server(["--workers", "2", "--shm-budget", "8M"])
    group = ConnectionGroup(server.address).connect()
    made = GroupBuffers(group).several(2, 5 << 20, pinned=False)
    assert len(made) == 1
    made[0].close()
    with pytest.raises(ServerError) as err:
        GroupBuffers(group).several(2, 5 << 20, pinned=False, least=2)
    assert err.value.code == "no_memory"
    for client in group.clients:
        client.flush_releases()     # each connection's worker frees what was made on it
    wait_for(lambda: group.clients[0].stats()["batch_buffers"] == 0,
             "the buffer made for a refused ask given back")
    group.close()


@pytest.mark.parametrize("size", [0, 2])
def test_connections_opened_together_are_one_group_over_every_worker(server, size):
    """A group's connections are opened with their hellos in flight together,
    each naming the group: one its first connection was issued when nothing
    was connected before (a spawned DataLoader worker's, or a group of a
    given size), so that any of them may fill the group's buffers."""
    group = ConnectionGroup(server.address, size)
    clients = group.clients
    assert len(clients) == 2 and len({c.worker for c in clients}) == 2
    assert {c.group for c in clients} == {group.group_id} != {None}
    buffer = GroupBuffers(group)(FRAME.nbytes, pinned=False)
    other = next(c for c in clients if c is not buffer.client)
    assert _get_into(other, buffer.into(0, 1, FRAME.shape, FRAME.dtype), events=[0])
    assert np.array_equal(buffer.lease(FRAME.shape, FRAME.dtype), FRAME)
    buffer.close()
    group.close()


def test_a_buffer_is_answered_ahead_of_frames_asked_before_it(start_server):
    """A DataLoader worker's first batch of an epoch waits for its buffer: the
    server answers it at once, not after the frames queued before it (nor
    never, while the client holds a window full of them and waits)."""
    server = start_server(["--workers", "1", "--cost-ms", "50"])
    with Client(server.address, timeout=30) as c:
        rid = c.submit("x", 1, "epix100", list(range(20)), "raw")
        made = c.make_arena(1 << 20)
        assert c.stats()["events"] < 20
        assert made.size >= 1 << 20
        for k, frame in enumerate(c.frames(rid)):
            with frame:
                assert np.array_equal(frame.array, expected("epix100", "raw", k))
        assert k == 19


def test_a_groups_buffers_count_against_its_fair_share(start_server):
    """Two groups hold memory: a share is 8M / 3. The first group may take no
    more on the connection that holds, while another connection of it
    holding nothing gets its one buffer (a client reading its connections in
    turn never waits on itself)."""
    server = start_server(["--workers", "2", "--shm-budget", "8M"])
    with Client(server.address) as first, Client(server.address) as second:
        first.make_arena(2 << 20)
        second.make_arena(1 << 20)
        with pytest.raises(ServerError) as err:
            first.make_arena(1 << 20, wait=False)
        assert err.value.code == "no_memory" and "share" in err.value.message
        with Client(server.address, group=first.group) as member:
            member.make_arena(1 << 20, wait=False)
        assert first.stats()["batch_buffers"] == 3


def test_a_client_that_vanishes_frees_its_buffers(server):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from psana_ipc.client import BatchLoader
        loader = BatchLoader({server.address!r}, "x", 1, "epix10k2M", "calib", range(40),
                             batch_size=4)
        batches = iter(loader)
        next(batches)
        print("drawn", flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "drawn"
        assert server_stats(server)["batch_buffers"] >= 2
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        wait_for(lambda: server_stats(server)["shm_bytes"] == 0, "a dead client's buffers freed")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _buffers_in_use(start_server):
    """A server, a loader with its buffers made, its iterator and first batch (a copy beside)."""
    server = start_server(["--workers", "2"])
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(8), batch_size=2,
                         output="numpy")
    batches = iter(loader)
    batch = next(batches)
    return server, loader, batches, batch


def test_a_batch_held_when_the_server_stops_stays_intact(start_server):
    server, loader, batches, batch = _buffers_in_use(start_server)
    assert server.stop() == 0
    assert not list(our_segments(server.pid))
    _check(batch, [0, 1])           # the server gave back every page but those held
    del batches
    loader.close()


def test_a_killed_server_leaves_only_its_lock_and_held_batches_intact(start_server):
    server, loader, batches, batch = _buffers_in_use(start_server)
    workers = server.workers
    for pid in [server.pid] + workers:          # nothing of the server gets to clean up
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_for(lambda: not any(pid_alive(p) for p in workers), "the workers gone")
    assert not list(our_segments(server.pid))
    assert os.path.exists(segment_path(lock_name(server.pid)))
    result = psana_ipc("cleanup")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(segment_path(lock_name(server.pid)))
    _check(batch, [0, 1])
    del batches
    loader.close()


def _dataset(server, events, **kw):
    return IPCRemotePsanaDataset(server.address, [("x", 1, "idx", "epix100", e) for e in events],
                                 mode="raw", **kw)


def test_dataloader_batches_without_workers_are_in_the_pool_in_order(server):
    events = [11, 3, 7, 0, 42, 5, 9, 1, 30, 8]
    for ds in (_dataset(server, events), RunDataset(server.address, "x", 1, "epix100", "raw",
                                                    events=events)):
        loader = DataLoader(ds, batch_size=4)
        for epoch in range(2):
            batches = list(loader)
            assert all(in_pool(b) for b in batches)
            _check(torch.cat([b.clone() for b in batches]), events)
            del batches
        ds.close()
    wait_for(lambda: server_stats(server)["batch_buffers"] == 0, "every buffer freed")


def test_buffers_a_dataset_no_longer_keeps_are_given_back(server):
    ds = _dataset(server, range(24), buffers=2)
    kept = list(DataLoader(ds, batch_size=3))         # every batch held: the ring grows
    assert server_stats(server)["batch_buffers"] >= 8
    _check(torch.cat(kept), range(24))
    del kept
    for _ in DataLoader(ds, batch_size=3):
        pass
    wait_for(lambda: server_stats(server)["batch_buffers"] <= 3, "at most 3 buffers kept")
    ds.close()


def test_dataloader_workers_of_later_epochs_fill_the_same_buffers(server):
    """No fresh memory per epoch: the group's buffers outlive the workers that
    asked for them and the next epoch's workers fill them again; a batch the
    main process still holds is never among them."""
    events = list(range(24))
    ds = _dataset(server, events)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    places, peaks, kept = [], [], None
    for epoch in range(3):
        for k, batch in enumerate(loader):
            assert in_pool(batch)
            places.append(pool_place(batch))
            _check(batch.clone(), events[4 * k:4 * k + 4])
            if epoch == 0 and k == 0:
                kept = batch                   # held across the later epochs
            del batch
        peaks.append(server_stats(server)["shm_peak_bytes"])
    assert set(places[6:12]) & set(places[:6]) and set(places[12:]) & set(places[6:12])
    assert places[0] not in places[1:], "a batch the main process holds was filled again"
    _check(kept, events[:4])
    assert peaks[2] == peaks[1], "later epochs took fresh memory"
    del loader, kept
    ds.close()
    wait_for(lambda: server_stats(server)["batch_buffers"] == 0, "every buffer freed")
