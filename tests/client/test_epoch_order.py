"""An epoch's order depends only on (seed, epoch, events), a saved position resumes it on any number of ranks without repeating or skipping an event, and the state is small, JSON and refused for other events or another order."""
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from psana_ipc.client.epoch_order import epoch_order, global_order
from psana_ipc.client.position import EpochCursor, StateError, fingerprint, where


def cursors(n, world, batch_size=2, seed=7, shuffle=True, padding="none", drop_last=False,
            events=None):
    events = list(range(n)) if events is None else events
    return [EpochCursor(n, lambda: events, seed, shuffle, padding, drop_last, batch_size, r,
                        world) for r in range(world)]


def lockstep(ranks, batch_size, steps=None):
    """Run ranks a batch at a time, all together, as DDP does; stop after `steps`
    steps (then return rank 0's state) or at the end of the epoch. Returns the
    events in global order (step by step, rank r's j-th event of a step at
    position j * world + r of it) and rank 0's state."""
    world = len(ranks)
    shares = [c.begin() for c in ranks]
    seen, step = [], 0
    while any(len(s) > step * batch_size for s in shares) and step != steps:
        batches = [s[step * batch_size:(step + 1) * batch_size] for s in shares]
        for j in range(batch_size):
            seen += [int(b[j]) for b in batches if j < len(b)]
        for c, b in zip(ranks, batches):
            c.consumed(len(b))
        step += 1
    if step != steps:
        for c in ranks:
            c.finished()
    return seen, ranks[0].state_dict(), world


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 60), before=st.integers(1, 5), after=st.integers(1, 5),
       batch_size=st.integers(1, 4), steps=st.integers(0, 8), epoch=st.integers(0, 3))
def test_a_resume_on_any_world_size_sees_every_event_once_in_the_same_order(
        n, before, after, batch_size, steps, epoch):
    whole, _, _ = lockstep(cursors(n, before, batch_size), batch_size)
    first = cursors(n, before, batch_size)
    for c in first:
        c.set_epoch(epoch)
    part, state, _ = lockstep(first, batch_size, steps)
    state = json.loads(json.dumps(state))
    second = cursors(n, after, batch_size)
    for c in second:
        c.load_state_dict(state)
        c.set_epoch(state["epoch"])
    rest, _, _ = lockstep(second, batch_size)
    reference = [int(p) for p in global_order(n, epoch, 7, True)]
    if state["epoch"] == epoch:
        assert part + rest == reference
    else:    # the first part finished the epoch: the resume is the next one, whole
        assert part == reference and sorted(rest) == list(range(n))
    assert len(whole) == n


@pytest.mark.parametrize("n, world, seed, epoch", [(10, 1, 0, 0), (9, 2, 3, 1), (17, 4, 7, 5)])
def test_wrap_padding_is_distributed_samplers_order(n, world, seed, epoch):
    events = list(range(100, 100 + n))
    for rank in range(world):
        sampler = DistributedSampler(events, num_replicas=world, rank=rank, shuffle=True,
                                     seed=seed)
        sampler.set_epoch(epoch)
        assert epoch_order(events, epoch, seed, True, rank, world, padding="wrap") == \
            [events[i] for i in sampler]
        assert epoch_order(events, epoch, seed, True, rank, world) == \
            [events[i] for i in sampler][: len(range(rank, n, world))]


def test_the_state_is_the_consumed_position_and_says_where_it_stands():
    ranks = cursors(30, 4, batch_size=2)
    _, state, _ = lockstep(ranks, 2, steps=3)
    assert len(json.dumps(state)) < 600
    assert {k: state[k] for k in ("epoch", "events_done", "batches_done", "batch_size",
                                  "world_size", "padding", "events")} == {
        "epoch": 0, "events_done": 24, "batches_done": 3, "batch_size": 2, "world_size": 4,
        "padding": "none", "events": 30}
    assert state["fingerprint"] == fingerprint(range(30))
    position = where({"model": [1, 2], "loader": state})
    assert position.events_done == 24
    assert position.describe().startswith("epoch 0: 24 of 30 events done (80%), 3 batches of 2")


def test_a_finished_epoch_points_at_the_next_one():
    ranks = cursors(10, 2)
    _, state, _ = lockstep(ranks, 2)
    assert (state["epoch"], state["events_done"]) == (1, 0)
    assert ranks[0].epoch == 0 and len(ranks[0].begin()) == 5     # the pass can be run again


def test_set_epoch_keeps_a_loaded_position_only_in_its_epoch():
    _, state, _ = lockstep(cursors(20, 2), 2, steps=2)
    resumed = cursors(20, 1)[0]
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert len(resumed.share()) == 12
    resumed.set_epoch(1)
    assert len(resumed.share()) == 20


def test_a_pass_after_an_abandoned_one_starts_the_epoch_again():
    cursor = cursors(20, 1)[0]
    cursor.begin()
    cursor.consumed(5)
    assert cursor.state_dict()["events_done"] == 5
    assert len(cursor.begin()) == 20


@pytest.mark.parametrize("change, code", [
    (dict(events=list(range(1, 31))), "other_events"),
    (dict(seed=8), "other_order"),
    (dict(shuffle=False), "other_order"),
    (dict(padding="wrap"), "other_order")])
def test_a_position_of_other_events_or_another_order_is_refused(change, code):
    _, state, _ = lockstep(cursors(30, 2), 2, steps=1)
    other = cursors(30, 3, **change)[0]
    with pytest.raises(StateError) as e:
        other.load_state_dict(state)
    assert e.value.code == code and "Error" not in e.value.message


@pytest.mark.parametrize("state, code", [({"epoch": 1}, "not_a_state"),
                                         ({"format": "psana-ipc/epoch-position", "version": 99},
                                          "other_version")])
def test_what_is_not_a_position_is_refused_in_plain_words(state, code):
    with pytest.raises(StateError) as e:
        cursors(3, 1)[0].load_state_dict(state)
    assert e.value.code == code


def test_wrap_padding_and_drop_last_give_every_rank_as_many_batches():
    for padding, drop_last in (("wrap", False), ("none", True)):
        ranks = cursors(31, 4, batch_size=2, padding=padding, drop_last=drop_last)
        lengths = {len(c.begin()) for c in ranks}
        assert len(lengths) == 1


def test_an_epoch_without_shuffle_never_imports_torch():
    """Which shuffle a position records is looked up, not imported: a loader
    that never shuffles costs no torch import (seconds) in a process without it."""
    code = ("import sys; from psana_ipc.client.position import EpochCursor; "
            "c = EpochCursor(4, lambda: [0, 1, 2, 3], 0, False, 'none', False, 2, 0, 1); "
            "print(c.begin(), c.state_dict()['generator'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["torch", "False"]
