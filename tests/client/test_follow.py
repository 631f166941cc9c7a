"""Client.follow, LiveRunDataset in DataLoader workers and BatchLoader(follow=...) hand out a run's events as they are written: every one once or the latest, split without repeats, through a server restart, ending with the run."""
import numpy as np
import pytest
from torch.utils.data import DataLoader

from live_helpers import server_args
from psana2_helpers import EXP, psana_python
from psana_ipc.client import BatchLoader, Client, LiveRunDataset
from psana_ipc.client.position import StateError
from psana_ipc.server.sources.synthetic import expected

RUN, EVENTS, RATE, PAUSE_AT = 31, 10, 20, 4
SMALL = ("--detectors", "cspad", "ebeam")       # a small area detector and a scalar


def test_a_finished_run_is_followed_to_its_end_every_event_or_the_latest(server):
    """The synthetic source's runs are complete: a follow hands out the
    events from `start` with their lag, or the newest alone, then ends."""
    last = 1000
    with Client(server.address) as c:
        every = c.follow("xpptut15", 14, "jungfrau4M", "raw", start=last - 3)
        events = list(every)
        assert [(e.event, e.lag, e.skipped) for e in events] == [(997, 2, 0), (998, 1, 0),
                                                                 (999, 0, 0)]
        for e in events:
            np.testing.assert_array_equal(e.frame, expected("jungfrau4M", "raw", e.event))
        assert every.reason == "run 14 of xpptut15 ended: it was complete"
        latest = c.follow("xpptut15", 14, "jungfrau4M", "raw", start=last - 5, policy="latest")
        assert [(e.event, e.skipped) for e in latest] == [(999, 4)]
        shares = [[e.event for e in c.follow("xpptut15", 14, "opal", "raw", start=last - 5,
                                             share=(k, 2))] for k in range(2)]
        assert shares == [[996, 998], [995, 997, 999]]     # by place among the events
        with pytest.raises(ValueError):
            c.follow("xpptut15", 14, "opal", policy="oldest")


@pytest.mark.psana2
def test_every_event_lags_and_the_latest_skips_while_a_run_grows(tmp_path, start_server,
                                                                 live_writer):
    writer = live_writer(tmp_path / "xtc", RUN, EVENTS, RATE, *SMALL, stop_after=[PAUSE_AT])
    writer.stopped(PAUSE_AT)
    server = start_server(server_args(tmp_path / "xtc"), python=psana_python())
    with Client(server.address) as c:
        every = c.follow(EXP, RUN, "cspad", "raw", timeout=60)
        latest = c.follow(EXP, RUN, "cspad", "raw", timeout=60, policy="latest")
        every_events, latest_events = iter(every), iter(latest)
        first = [next(every_events) for _ in range(PAUSE_AT)]
        newest = next(latest_events)
        writer.resume()
        rest, later = list(every_events), list(latest_events)
    writer.finish()
    assert [(e.event, e.lag) for e in first] == [(k, PAUSE_AT - 1 - k) for k in range(PAUSE_AT)]
    assert [e.event for e in first + rest] == list(range(EVENTS))
    assert (newest.event, newest.skipped, newest.lag) == (PAUSE_AT - 1, PAUSE_AT - 1, 0)
    handed = [newest.event] + [e.event for e in later]
    assert handed == sorted(set(handed)) and handed[-1] == EVENTS - 1
    assert latest.skipped == EVENTS - len(handed)
    assert "EndRun" in every.reason and "EndRun" in latest.reason


@pytest.mark.psana2
def test_dataloader_workers_and_ranks_split_a_growing_run_without_repeats(tmp_path,
                                                                          start_server,
                                                                          live_writer):
    writer = live_writer(tmp_path / "xtc", RUN, EVENTS, RATE, *SMALL, stop_after=[3])
    writer.stopped(3)
    server = start_server(server_args(tmp_path / "xtc", workers=2), python=psana_python())
    dataset = LiveRunDataset(server.address, EXP, RUN, "cspad", "raw", metadata=True, timeout=60)
    batches = iter(DataLoader(dataset, batch_size=2, num_workers=2))
    frames, first = next(batches)            # worker 0's events 0 and 2, written before
    writer.resume()
    found = [first] + [meta for _, meta in batches]
    writer.finish()
    assert first["event"].tolist() == [0, 2] and frames.shape == (2, 1, 185, 388)
    events = [e for meta in found for e in meta["event"].tolist()]
    assert sorted(events) == list(range(EVENTS))
    for rank in range(2):     # rank 0's batches written in place in the pool, rank 1's copied
        loader = BatchLoader(server.address, EXP, RUN, "cspad", "raw", batch_size=3,
                             rank=rank, world_size=2, follow={"timeout": 60}, output="numpy",
                             arenas=rank == 0)
        with pytest.raises(TypeError):
            len(loader)
        with pytest.raises(StateError, match="followed"):
            loader.state_dict()
        batches = [np.array(batch) for batch in loader]
        assert [batch.shape[0] for batch in batches] == [3, 2]
        with Client(server.address) as c:
            mine = c.get_many(EXP, RUN, "cspad", range(rank, EVENTS, 2), mode="raw")
        np.testing.assert_array_equal(np.concatenate(batches), mine)
        assert "EndRun" in loader.follower.reason
        assert loader.follower.lag == 1 - rank     # rank 1 has the last event


@pytest.mark.psana2
def test_a_follow_goes_on_through_a_server_restart_and_ends_if_a_run_never_begins(
        tmp_path, start_server, live_writer):
    socket = tmp_path / "iserver.sock"
    writer = live_writer(tmp_path / "xtc", RUN, EVENTS, RATE, *SMALL, stop_after=[PAUSE_AT])
    writer.stopped(PAUSE_AT)
    args = server_args(tmp_path / "xtc") + ["--unix", str(socket)]
    first = start_server(args, python=psana_python())
    with Client(first.address) as c:
        follower = c.follow(EXP, RUN, "cspad", "raw", timeout=60)
        events = iter(follower)
        before = [next(events).event for _ in range(PAUSE_AT)]
        assert first.stop() == 0
        start_server(args, python=psana_python())
        writer.resume()
        after = [e.event for e in events]
        writer.finish()
        never = c.follow(EXP, RUN + 50, "cspad", timeout=0.5)
        assert list(never) == []
    assert before + after == list(range(EVENTS))
    assert "EndRun" in follower.reason
    assert never.reason == f"run {RUN + 50} of {EXP} did not begin within 0.5 s"
