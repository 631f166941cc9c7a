"""Batch arenas: the server's workers write every frame of a batch in place,
the client wraps the batch with no copy. Bytes, order, the lifetime rule,
what the server refuses, and that nothing outlives a client or the server."""
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
from psana_ipc.client import batch_handoff
from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.messages import FreeArenas, Into
from psana_ipc.protocol.shm_names import parse_segment_name
from psana_ipc.server.shm import our_segments
from psana_ipc.server.sources.synthetic import expected

from conftest import ROOT, pid_alive
from test_batch_loader import _eventually
from test_lifecycle import _psana_ipc

FRAME = expected("epix100", "raw", 0)


def _mapping(array) -> list:
    """The /proc/self/maps line of the memory of an array (or tensor), split."""
    address = np.asarray(array).__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields
    return []


def _backing(array) -> str:
    """The file the memory of an array (or tensor) is mapped from (its name when mapped)."""
    fields = _mapping(array)
    return fields[5] if len(fields) > 5 else ""


def _inode(array) -> int:
    return int(_mapping(array)[4])


def _arenas_of(server) -> list:
    return [n for n in our_segments(server.pid) if parse_segment_name(n).serial.startswith("a")]


def _check(batch, events, det="epix100", mode="raw"):
    batch = np.asarray(batch)
    assert len(batch) == len(events)
    for row, e in zip(batch, events):
        assert np.array_equal(row, expected(det, mode, e))


def test_arena_batches_hold_the_bytes_in_order_and_are_the_arena_itself(server):
    events = [7, 3, 3, 11, 0, 5, 9]
    loader = BatchLoader(server.address, "x", 1, "jungfrau4M", "calib", events, batch_size=3)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert all(isinstance(b, torch.Tensor) and b.is_contiguous() for b in batches)
    for batch in batches:
        assert _backing(batch).startswith(f"/dev/shm/psipc_{server.pid}_")
    _check(torch.cat([b.clone() for b in batches]), events, "jungfrau4M", "calib")
    assert len(_arenas_of(server)) == loader.buffers + loader.depth - 1
    loader.close()
    assert _eventually(lambda: not _arenas_of(server)), "closing the loader left its arenas"


def test_shuffled_epochs_in_arenas_read_what_their_order_says(server):
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(10), batch_size=4,
                         shuffle=True, seed=3, output="numpy")
    for epoch in range(2):
        loader.set_epoch(epoch)
        got = np.concatenate([b.copy() for b in loader])
        order = loader._order()
        _check(got, order)
    loader.close()


@pytest.mark.parametrize("buffers,depth", [(2, 2), (1, 3), (3, 1)])
def test_no_arena_batch_is_overwritten_while_held_under_the_rule(server, buffers, depth):
    """A batch stays intact until `buffers` further batches have been drawn, across
    epochs too; after that its arena is reused."""
    events = list(range(14))
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", events, batch_size=2,
                         buffers=buffers, depth=depth, output="numpy")
    ring = buffers + depth - 1
    held = []
    for epoch in range(2):
        for batch in loader:
            held.append((batch, events[2 * (len(held) % 7): 2 * (len(held) % 7) + 2]))
            for old, evs in held[-buffers:]:
                _check(old, evs)
    assert len(held) == 14
    for k in range(len(held) - ring):
        assert np.shares_memory(held[k][0], held[k + ring][0])
        assert not any(np.shares_memory(held[k][0], held[j][0]) for j in range(k + 1, k + ring))
    loader.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_arenas_are_pinned_and_go_to_the_gpu_as_written(server):
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(4), batch_size=2)
    for k, batch in enumerate(loader):
        assert batch.is_pinned()
        on_gpu = batch.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        _check(on_gpu.cpu(), [2 * k, 2 * k + 1])
    loader.close()


@pytest.fixture
def arena(server):
    """A client of the server with one arena of room for two epix100 raw frames."""
    with Client(server.address) as client:
        made = client.make_arena(2 * FRAME.nbytes)
        yield client, made


def _into(name, offsets, shape=FRAME.shape, dtype=FRAME.dtype.str):
    return Into(name, tuple(offsets), tuple(shape), dtype)


def _get_into(client, into, events=(4,)):
    rid = client.submit("x", 1, "epix100", list(events), "raw", into=into)
    return [reply for reply, _ in client.replies(rid)]


def test_a_group_member_writes_frames_at_their_offsets(server, arena):
    owner, made = arena
    with Client(server.address, group=owner.group) as member:
        replies = _get_into(member, _into(made.name, [FRAME.nbytes, 0]), events=(4, 9))
    assert [f.event for f in replies[0].frames] == [4, 9]
    with open(f"/dev/shm/{made.name}", "rb") as f:
        data = np.frombuffer(f.read(2 * FRAME.nbytes), FRAME.dtype).reshape((2,) + FRAME.shape)
    _check(data, [9, 4])


@pytest.mark.parametrize("extra", [{"fields": ["ebeam.ebeamPhotonEnergy"]},
                                   {"skip_incomplete": True}])
def test_a_get_into_an_arena_takes_no_fields_and_skips_nothing(arena, extra):
    """Values would need a reply per frame and a skipped event would leave a row
    unwritten: both are refused, and the arena is left as it was."""
    client, made = arena
    rid = client.submit("x", 1, "epix100", [4], "raw", into=_into(made.name, [0]), **extra)
    with pytest.raises(ServerError) as err:
        list(client.replies(rid))
    assert err.value.code == "bad_request" and "arena" in err.value.message
    with open(f"/dev/shm/{made.name}", "rb") as f:
        assert not any(f.read())
    with pytest.raises(ValueError, match="arenas"):
        BatchLoader(client.address, "x", 1, "epix100", "raw", range(4), arenas=True, **extra)


def test_arena_batches_are_copied_from_the_frame_cache_and_hints_still_go_out(start_server):
    server = start_server(["--workers", "2", "--frame-cache", "256M"])
    events = list(range(8))
    with Client(server.address) as c:
        c.prefetch("x", 1, "epix100", events, "raw")
        assert _eventually(lambda: c.stats()["frame_cache"]["read_ahead"] == len(events))
        reads = c.stats()["events"]
        loader = BatchLoader(server.address, "x", 1, "epix100", "raw", events, batch_size=4,
                             output="numpy", read_ahead=0)
        _check(np.concatenate([b.copy() for b in loader]), events)
        assert _arenas_of(server)
        stats = c.stats()
        assert stats["events"] == reads                       # no source read: cache hits
        assert stats["frame_cache"]["hits"] == len(events)
        assert stats["frame_cache"]["pinned"] == 0            # every hit unpinned again
        loader.close()
        more = list(range(8, 32))
        loader = BatchLoader(server.address, "x", 1, "epix100", "raw", more, batch_size=4,
                             output="numpy", depth=1, read_ahead=8)
        _check(np.concatenate([b.copy() for b in loader]), more)
        assert _arenas_of(server)
        assert c.stats()["frame_cache"]["read_ahead"] > len(events)   # hinted from the loader
        loader.close()


@pytest.mark.parametrize("case,code_offsets,shape,dtype", [
    ("past the end", [FRAME.nbytes + 2], FRAME.shape, FRAME.dtype.str),
    ("misaligned", [1], FRAME.shape, FRAME.dtype.str),
    ("wrong shape", [0], (4, 4), FRAME.dtype.str),
    ("wrong dtype", [0], FRAME.shape, "<u4"),
    ("object dtype", [0], FRAME.shape, "|O"),
    ("not a dtype", [0], FRAME.shape, "nonsense"),
    ("huge shape", [0], (2 ** 40, 2 ** 40), FRAME.dtype.str),
])
def test_a_bad_place_in_an_arena_is_refused_before_anything_is_written(arena, case,
                                                                       code_offsets, shape,
                                                                       dtype):
    client, made = arena
    with pytest.raises(ServerError) as err:
        _get_into(client, _into(made.name, code_offsets, shape, dtype))
    assert err.value.code == "bad_arena", case
    with open(f"/dev/shm/{made.name}", "rb") as f:
        assert not any(f.read())
    assert client.ping()                       # the connection goes on


def test_one_offset_per_event_and_no_negative_offsets(arena):
    """Both are the request's own faults: a get that lacks offsets is answered
    as the server answers it; a negative offset is no place at all and cannot
    even be written down (the server parses it into the same refusal)."""
    client, made = arena
    with pytest.raises(ServerError) as err:
        _get_into(client, _into(made.name, [0]), events=(1, 2))
    assert err.value.code == "bad_arena"
    with pytest.raises(ProtocolError) as refused:
        _into(made.name, [-8, 0])
    assert refused.value.code == "bad_arena"


def test_arenas_of_another_group_or_not_arenas_at_all_are_refused(server, arena):
    owner, made = arena
    slot_name = owner.view("x", 1, "epix100", 0, "raw")
    slot_name.release()
    owner.flush_releases()
    names = [made.name, slot_name.reply.name, "../../etc/passwd", "psipc_1_2_a00x0"]
    with Client(server.address) as stranger:
        assert stranger.group != owner.group
        for name in names:
            with pytest.raises(ServerError) as err:
                _get_into(stranger, _into(name, [0]))
            assert err.value.code == "bad_arena", name
    with pytest.raises(ServerError) as err:
        _get_into(owner, _into(slot_name.reply.name, [0]))
    assert err.value.code == "bad_arena"


def test_a_group_id_the_server_did_not_issue_is_refused(server, arena):
    owner, _ = arena
    nonce, _, mac = owner.group.partition(".")
    forged = f"{nonce}.{'0' * len(mac)}" if mac != "0" * len(mac) else f"{nonce}.{'1' * len(mac)}"
    with pytest.raises(ServerError) as err:
        Client(server.address, group=forged).connect()
    assert err.value.code == "bad_arena"


def test_an_arena_needs_shared_memory(server):
    with Client(server.address, transport="inline") as client:
        with pytest.raises(ServerError) as err:
            client.make_arena(4096)
        assert err.value.code == "bad_arena"
        loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(4), batch_size=2,
                             transport="inline", output="numpy")
        _check(np.concatenate([b.copy() for b in loader]), range(4))   # copies instead
        loader.close()


def test_an_arena_larger_than_the_budget_is_refused_and_the_loader_copies_instead(
        start_server):
    server = start_server(["--workers", "2", "--shm-budget", "4M"])
    with Client(server.address) as client:
        with pytest.raises(ServerError) as err:
            client.make_arena(8 << 20)
        assert err.value.code == "no_memory" and "an arena" in err.value.message
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(6), batch_size=3,
                         output="numpy")
    with pytest.warns(UserWarning, match="no room for batch arenas"):
        got = np.concatenate([b.copy() for b in loader])
    _check(got, range(6))
    loader.close()


def test_a_client_that_vanishes_frees_its_arenas(server):
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
        assert len(_arenas_of(server)) == 3
        with Client(server.address) as c:
            assert c.stats()["shm_bytes"] > 0
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            assert _eventually(lambda: not _arenas_of(server)), "a dead client's arenas stay"
            assert _eventually(lambda: c.stats()["shm_bytes"] == 0)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _arenas_in_use(start_server):
    """A server, a loader with its arenas made, the loader's iterator and its first batch."""
    server = start_server(["--workers", "2"])
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(8), batch_size=2,
                         output="numpy")
    batches = iter(loader)
    batch = next(batches)
    assert _arenas_of(server)
    return server, loader, batches, batch


def test_a_server_stopped_with_arenas_in_use_leaves_nothing(start_server):
    server, loader, batches, batch = _arenas_in_use(start_server)
    assert server.stop() == 0
    assert not list(our_segments(server.pid))
    _check(batch, [0, 1])           # what the client mapped stays readable
    del batches
    loader.close()


def test_cleanup_removes_the_arenas_of_a_killed_server(start_server):
    server, loader, batches, _ = _arenas_in_use(start_server)
    workers = server.workers
    for pid in [server.pid] + workers:          # nothing of the server gets to clean up
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    assert _eventually(lambda: not any(pid_alive(p) for p in workers))
    assert _arenas_of(server)
    result = _psana_ipc("cleanup")
    assert result.returncode == 0, result.stderr
    assert not list(our_segments(server.pid))
    del batches
    loader.close()


def _dataset(server, events, **kw):
    return IPCRemotePsanaDataset(server.address, [("x", 1, "idx", "epix100", e) for e in events],
                                 mode="raw", **kw)


def test_dataloader_batches_without_workers_are_arenas_in_order(server):
    events = [11, 3, 7, 0, 42, 5, 9, 1, 30, 8]
    for ds in (_dataset(server, events), RunDataset(server.address, "x", 1, "epix100", "raw",
                                                    events=events)):
        loader = DataLoader(ds, batch_size=4)
        for epoch in range(2):
            batches = list(loader)
            assert all(_backing(b).startswith(f"/dev/shm/psipc_{server.pid}_") for b in batches)
            _check(torch.cat([b.clone() for b in batches]), events)
            del batches
        ds.close()
    assert _eventually(lambda: not _arenas_of(server))


def test_arenas_a_dataset_no_longer_keeps_are_given_back(server):
    ds = _dataset(server, range(24), buffers=2)
    kept = list(DataLoader(ds, batch_size=3))         # every batch held: the ring grows
    assert len(_arenas_of(server)) >= 8
    _check(torch.cat(kept), range(24))
    del kept
    for _ in DataLoader(ds, batch_size=3):
        pass
    with Client(server.address) as c:
        c.ping()
    assert _eventually(lambda: len(_arenas_of(server)) <= 3), _arenas_of(server)
    ds.close()


def test_only_arenas_of_the_connection_can_be_freed(server, arena):
    owner, made = arena
    with Client(server.address, group=owner.group) as member:
        with pytest.raises(ServerError) as err:
            member.call(FreeArenas((made.name,)))
        assert err.value.code == "bad_arena"
    owner.free_arena(made.name)
    assert owner.ping()
    assert made.name not in _arenas_of(server)


def test_dataloader_worker_batches_are_arenas_the_next_epochs_workers_fill_again(server):
    events = list(range(24))
    ds = _dataset(server, events)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    inodes = []
    for epoch in range(3):
        batches = 0
        for batch in loader:
            assert _backing(batch).startswith(f"/dev/shm/psipc_{server.pid}_")
            inodes.append(_inode(batch))
            _check(batch.clone(), events[4 * batches:4 * batches + 4])
            batches += 1
            del batch
        # the workers are gone; the main process keeps their arenas (under new names)
        kept = {os.stat(f"/dev/shm/{n}").st_ino for n in _arenas_of(server)}
        assert set(inodes[-batches:]) <= kept
    assert inodes[6] in inodes[:6] and inodes[12] in inodes[6:12]   # filled again
    del loader
    ds.close()
    assert _eventually(lambda: not _arenas_of(server))


def test_an_arena_adopted_by_another_connection_of_the_group_outlives_its_maker(server):
    maker = Client(server.address).connect()
    made = maker.make_arena(FRAME.nbytes)
    with Client(server.address, group=maker.group) as keeper:
        adopted = keeper.adopt_arena(made.name)
        assert adopted.name != made.name and adopted.size == made.size
        assert _arenas_of(server) == [adopted.name]
        _get_into(maker, _into(adopted.name, [0]), events=(6,))      # still the group's to write
        with open(f"/dev/shm/{adopted.name}", "rb") as f:
            _check(np.frombuffer(f.read(FRAME.nbytes), FRAME.dtype).reshape((1,) + FRAME.shape),
                   [6])
        maker.close()
        assert _eventually(lambda: keeper.stats()["connections"] == 1)
        assert _arenas_of(server) == [adopted.name]
        with Client(server.address) as stranger:                  # another group
            with pytest.raises(ServerError) as err:
                stranger.adopt_arena(adopted.name)
            assert err.value.code == "bad_arena"
        with pytest.raises(ServerError) as err:
            keeper.adopt_arena(made.name)                      # gone
        assert err.value.code == "bad_arena"
    assert _eventually(lambda: not _arenas_of(server))


def test_only_an_arena_of_the_group_can_be_adopted(server, arena):
    owner, made = arena
    slot = owner.view("x", 1, "epix100", 3, "raw")
    planted = f"psipc_{server.pid}_{os.getpid()}_a0x0"
    with open(f"/dev/shm/{planted}", "wb") as f:
        f.write(b"\0" * 4096)
    try:
        for name in (slot.desc["name"], "../../etc/passwd", planted, made.name + "x",
                     made.name.replace(f"psipc_{server.pid}_", f"psipc_{server.pid + 1}_")):
            with pytest.raises(ServerError) as err:
                owner.adopt_arena(name)
            assert err.value.code == "bad_arena", name
        assert os.path.exists(f"/dev/shm/{planted}")
        assert _arenas_of(server).count(made.name) == 1
    finally:
        slot.release()
        os.unlink(f"/dev/shm/{planted}")


def test_adopting_or_making_an_arena_without_waiting_fails_at_once_without_room(start_server):
    server = start_server(["--workers", "2", "--shm-budget", "4M"])
    with Client(server.address) as maker, Client(server.address) as other:
        made = maker.make_arena(3 << 20)
        with pytest.raises(ServerError) as err:
            other.make_arena(3 << 20, wait=False)
        assert err.value.code == "no_memory" and "an arena" in err.value.message
        with Client(server.address, group=maker.group) as keeper:
            with pytest.raises(ServerError) as err:
                keeper.adopt_arena(made.name)
            assert err.value.code == "no_memory"
        assert _arenas_of(server) == [made.name]


def test_adopting_is_no_way_around_a_connections_fair_share(start_server):
    server = start_server(["--workers", "2", "--shm-budget", "8M"])
    with Client(server.address) as maker:
        made = maker.make_arena(3 << 20)
        with Client(server.address, group=maker.group) as keeper:
            keeper.make_arena(1 << 20)          # two holders: a share is 8M / 3
            with pytest.raises(ServerError) as err:
                keeper.adopt_arena(made.name)
            assert err.value.code == "no_memory" and "share" in err.value.message
            with Client(server.address, group=maker.group) as another:   # holds nothing yet
                assert another.adopt_arena(made.name).size == made.size


def test_the_main_process_gives_back_kept_arenas_beyond_its_spare_ones(server):
    ds = _dataset(server, range(40))
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    held = list(loader)                      # every batch held: 20 arenas kept
    _check(torch.cat(held), range(40))
    assert len(_arenas_of(server)) >= 20
    del held
    for _ in loader:                         # nothing held: idle ones beyond SPARE go
        pass
    assert _eventually(lambda: len(_arenas_of(server)) <= batch_handoff.SPARE + 2 * 2 + 1)
    del loader
    ds.close()
    assert _eventually(lambda: not _arenas_of(server))
