"""A call into a source (server/frame_reader.py `SourceCall`), in process: the
worker is marked busy for the master's watchdog exactly while inside, a
source's own failure becomes the coded error, and a user's passes through."""
import logging

import pytest

from psana_ipc.protocol.errors import OUT_OF_RANGE, READ_FAILED
from psana_ipc.server.frame_reader import SourceCall
from psana_ipc.server.shared_state import SharedState
from psana_ipc.server.sources.base import SourceError


@pytest.fixture()
def state() -> SharedState:
    return SharedState(2)


def test_the_worker_is_busy_inside_a_call_only(state):
    with SourceCall(state.counters(1), READ_FAILED, "reading event %d", (3,)):
        assert state.in_source_call(1) and not state.in_source_call(0)
    assert not state.in_source_call(1)


def test_a_source_failure_becomes_the_coded_error_naming_the_call(state, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SourceError) as e:
        with SourceCall(state.counters(0), READ_FAILED, "reading event %d", (7,)):
            raise RuntimeError("corrupt")
    assert e.value.code == READ_FAILED
    assert e.value.message == "reading event 7 failed: RuntimeError: corrupt"
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "reading event 7 failed" in caplog.text and "RuntimeError: corrupt" in caplog.text
    assert not state.in_source_call(0)


def test_an_error_a_user_can_cause_passes_through_unchanged(state):
    refused = SourceError(OUT_OF_RANGE, "event 9 is out of range")
    with pytest.raises(SourceError) as e:
        with SourceCall(state.counters(0), READ_FAILED, "reading event %d", (9,)):
            raise refused
    assert e.value is refused
    assert not state.in_source_call(0)
