"""Answering `follow`: where a run stands, and which events of a detector
were written since the client's last look.

A client following a run as the DAQ writes it (client/follow.py) asks again
and again, past the last event it got; each answer is given at once, from
what the worker's open source knows after one look at the run's files. A
worker serves many connections from one loop, so it never waits for a run
to grow: the client's interval between asks is the only wait, and it is
the client's. Any source answers: one whose runs are complete when opened
lists its whole run and says it ended (`finished`); the psana2 source reads
a run as it is written; a source fed by the DAQ's shared memory would say
`live` the same way, its events past those it still holds out of range.
"""
from bisect import bisect_right
from typing import TYPE_CHECKING, Any, Dict

from psana_ipc.protocol.errors import ProtocolError
from psana_ipc.protocol.messages import MAX_FOLLOWED, Follow, RunKey
from psana_ipc.protocol.replies import ErrorReply, Reply, RunProgress

if TYPE_CHECKING:
    from .frame_reader import FrameReader, OpenSources


def progress(sources: "OpenSources", request: Follow) -> Dict[str, Any]:
    """The fields of the answer to `request` (see RunProgress)."""
    source = sources.get(RunKey(request.exp, request.run, request.detector))
    state = source.growth()            # a growing run takes in what was written first
    held = source.held()
    if request.codes is not None:
        chosen = set(sources.factory.events_with_codes(request.exp, request.run, request.codes))
        held = [event for event in held if event in chosen]
    start = bisect_right(held, request.after)
    following = None
    if request.next_run:
        following = sources.factory.next_run(request.exp, request.run)
    return dict(state, events=tuple(held[start:start + MAX_FOLLOWED]), position=start,
                held=len(held), next_run=-1 if following is None else following)


def follow_reply(reader: "FrameReader", rid: int, request: Follow) -> Reply:
    """The reply to a follow request: its progress, or the error a user can act on."""
    try:
        return RunProgress(rid, **reader.follow(request))
    except ProtocolError as e:
        reader.counters.error(e.code)
        return ErrorReply(rid, e.code, e.message)
