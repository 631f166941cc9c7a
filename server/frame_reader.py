"""Opening sources (kept open per worker, least recently used closed first), telling a frame's size
before reading it, and reading frames with the fields asked beside them: the
part of serving that both dialects share."""
import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from psana_ipc.protocol.errors import INTERNAL, READ_FAILED, ProtocolError
from psana_ipc.protocol.messages import Follow, Get, Info, RunKey
from psana_ipc.protocol.replies import FrameDesc

from .live import progress
from .shared_state import Counters
from .sources.base import (Allocator, FrameMeta, Source, SourceError, SourceFactory,
                           frame_bytes)
from .sources.event_ranges import as_ranges, expand

log = logging.getLogger(__name__)
SourceKey = Tuple[str, str, int, str, str]
Frame = Tuple[np.ndarray, FrameMeta]


def frame_desc(data: np.ndarray, meta: FrameMeta) -> FrameDesc:
    """What a reply says about a frame besides where its bytes are."""
    return FrameDesc(data.shape, data.dtype.str, meta.timestamp, meta.calibrated, meta.extra)


class OpenSources:
    """Open sources of one worker (`--open-sources`), the least recently used
    closed first.

    Keyed by (source kind, exp, run, detector, access mode): two detectors
    of one run, or one detector of two runs, are separate entries.
    """

    def __init__(self, factory: SourceFactory, size: int) -> None:
        self.factory = factory
        self.size = size
        self._open: "OrderedDict[SourceKey, Source]" = OrderedDict()

    def get(self, key: RunKey) -> Source:
        ck = (self.factory.name, key.exp, key.run, key.detector, key.access_mode)
        source = self._open.get(ck)
        if source is not None:
            self._open.move_to_end(ck)
            return source
        source = self.factory.open(key)
        self._open[ck] = source
        while len(self._open) > self.size:
            _, old = self._open.popitem(last=False)
            old.close()
        return source

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


class SourceCall:
    """A call into a source, marked busy for the master's watchdog meanwhile.
    Errors a user can cause pass through; a source's own failure becomes
    `code` (it must not take the worker down). A class, not a generator, and
    its message formatted only on failure: every frame makes two."""

    __slots__ = ("counters", "code", "what", "args")

    def __init__(self, counters: Counters, code: str, what: str, args: Tuple[Any, ...]) -> None:
        self.counters, self.code, self.what, self.args = counters, code, what, args

    def __enter__(self) -> None:
        self.counters.busy(True)

    def __exit__(self, kind: Any, e: Optional[BaseException], trace: Any) -> None:
        self.counters.busy(False)
        if e is None or isinstance(e, ProtocolError) or not isinstance(e, Exception):
            return
        what = self.what % self.args
        log.error("%s failed", what, exc_info=(kind, e, trace))
        raise SourceError(self.code, f"{what} failed: {type(e).__name__}: {e}") from e


class FrameReader:
    """Reads one event into memory a connection reserved, counting it."""

    def __init__(self, sources: OpenSources, counters: Counters) -> None:
        self.sources = sources
        self.counters = counters

    def _source_call(self, code: str, what: str, *args: Any) -> SourceCall:
        return SourceCall(self.counters, code, what, args)

    def frame_size(self, get: Get, event: int) -> Optional[int]:
        """The bytes the frame of this event will take, before reading it (None:
        the source cannot tell ahead, or failed to; read it with `read_private`
        first)."""
        with self._source_call(READ_FAILED, "opening %s", get.key):
            source = self.sources.get(get.key)
            source.check(event, get.mode)
        try:
            return source.frame_nbytes(get.mode)
        except Exception:       # the read that follows says what is wrong, if anything
            log.exception("sizing a frame of %s failed: reading it first", get.key)
            return None

    def read(self, get: Get, event: int, into: Allocator, reserved: int,
             prefetched: Optional[Frame] = None) -> Frame:
        """The frame of one event of a get, written once into the `reserved`
        bytes `into` gives (copied there if it was read ahead by `read_private`)."""
        def allocate(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            nbytes = frame_bytes(shape, dtype)
            if nbytes > reserved:
                raise SourceError(READ_FAILED, f"event {event} is {nbytes} bytes, more than the "
                                               f"{reserved} its source announced")
            return into(shape, dtype)

        values = self.values(get, event)
        if prefetched is not None:
            data, meta = prefetched
            out = allocate(data.shape, data.dtype)
            np.copyto(out, data, casting="no")
            return out, _with_values(meta, values)
        with self._source_call(READ_FAILED, "reading event %d", event):
            data, meta = self.sources.get(get.key).read_into(event, get.mode, allocate)
        self.counters.frame(data.nbytes)
        return data, _with_values(meta, values)

    def values(self, get: Get, event: int) -> Dict[str, Any]:
        """The fields a get asks beside its frame (read first: an event
        without one fails before the frame is written)."""
        if not get.fields:
            return {}
        with self._source_call(READ_FAILED, "reading fields of event %d", event):
            source = self.sources.get(get.key)
            return {ref.name: source.field(event, ref) for ref in get.fields}

    def read_private(self, get: Get, event: int) -> Frame:
        """The frame in fresh private memory: for a source whose frame size is
        known only once read."""
        with self._source_call(READ_FAILED, "reading event %d", event):
            data, meta = self.sources.get(get.key).read_into(event, get.mode, np.empty)
        self.counters.frame(data.nbytes)
        return data, meta

    def info(self, request: Info) -> Dict[str, Any]:
        """Run-level: every detector; with `present`, each one's events as
        [start, stop, step] ranges. Detector-level: its events and modes.
        With `codes`, events count (and `present` lists) only the events
        those event codes choose."""
        with self._source_call(INTERNAL, "info for %s", request):
            if request.detector is None:
                found = self.sources.factory.detectors(request.exp, request.run)
                chosen = self._chosen(request)
                for det in found.values():
                    held = det.pop("present", [[0, det["events"], 1]])
                    if chosen is not None:
                        held = _among(held, chosen)
                        det["events"] = len(expand(held))
                    if request.present:
                        det["present"] = held
                state = self.sources.factory.run_state(request.exp, request.run)
                return dict(state, detectors=found)
            source = self.sources.get(RunKey(request.exp, request.run, request.detector))
            info = source.info()
            held = source.present()
            chosen = self._chosen(request)
            if chosen is not None:
                held = _among(held, chosen)
                info["events"] = len(expand(held))
            if request.present:
                info["present"] = held
            return info

    def follow(self, request: Follow) -> Dict[str, Any]:
        """Where a run stands and the detector's events past `request.after`
        (see live.py)."""
        with self._source_call(INTERNAL, "follow for %s", request):
            return progress(self.sources, request)

    def _chosen(self, request: Info) -> Optional[Set[int]]:
        if request.codes is None:
            return None
        return set(self.sources.factory.events_with_codes(request.exp, request.run, request.codes))


def _among(ranges: List[List[int]], chosen: Set[int]) -> List[List[int]]:
    return as_ranges([e for e in expand(ranges) if e in chosen])


def _with_values(meta: FrameMeta, values: Dict[str, Any]) -> FrameMeta:
    if not values:
        return meta
    return dataclasses.replace(meta, extra=dict(meta.extra, values=values))
