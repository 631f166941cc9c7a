"""Opening sources (through a per-worker LRU cache) and reading frames, the
part of serving that both dialects share."""
import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Dict, Tuple

import numpy as np

from psana_ipc.protocol.errors import INTERNAL, READ_FAILED, ProtocolError
from psana_ipc.protocol.messages import Get, Info, RunKey

from .shared_state import COL, SharedState
from .sources.base import Allocator, FrameMeta, Source, SourceError, SourceFactory

log = logging.getLogger(__name__)
CacheKey = Tuple[str, str, int, str, str]


class SourceCache:
    """Open sources of one worker, least recently used evicted first.

    Keyed by (source kind, exp, run, detector, access mode): two detectors
    of one run, or one detector of two runs, are separate entries.
    """

    def __init__(self, factory: SourceFactory, size: int) -> None:
        self.factory = factory
        self.size = size
        self._open: "OrderedDict[CacheKey, Source]" = OrderedDict()

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


class FrameReader:
    """Reads one event into memory a connection provides, counting it."""

    def __init__(self, cache: SourceCache, state: SharedState, slot: int) -> None:
        self.cache = cache
        self.state = state
        self.slot = slot
        self.row = state.row(slot)

    def read(self, get: Get, event: int, allocate: Allocator) -> Tuple[np.ndarray, FrameMeta]:
        """The frame of one event of a get; errors are ProtocolError with a code."""
        try:
            with self.state.busy(self.slot):
                source = self.cache.get(get.key)
                values = {ref.name: source.field(event, ref) for ref in get.fields}
                data, meta = source.read_into(event, get.mode, allocate)
        except ProtocolError:
            raise
        except Exception as e:  # a source's own failure must not take the worker down
            log.exception("reading event %d of %s failed", event, get.key)
            raise SourceError(READ_FAILED, f"reading event {event} failed: "
                                           f"{type(e).__name__}: {e}") from e
        self.row[COL["events"]] += 1
        self.row[COL["bytes"]] += data.nbytes
        if values:
            meta = dataclasses.replace(meta, extra=dict(meta.extra, values=values))
        return data, meta

    def info(self, request: Info) -> Dict[str, Any]:
        """Run-level: every detector; with `present`, each one's events as
        [start, stop, step] ranges. Detector-level: its events and modes."""
        try:
            with self.state.busy(self.slot):
                if request.detector is None:
                    found = self.cache.factory.detectors(request.exp, request.run)
                    for det in found.values():
                        held = det.pop("present", [[0, det["events"], 1]])
                        if request.present:
                            det["present"] = held
                    return {"detectors": found}
                source = self.cache.get(RunKey(request.exp, request.run, request.detector))
                info = source.info()
                if request.present:
                    info["present"] = source.present()
                return info
        except ProtocolError:
            raise
        except Exception as e:
            log.exception("info for %s failed", request)
            raise SourceError(INTERNAL, f"info failed: {type(e).__name__}: {e}") from e
