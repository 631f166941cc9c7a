"""v1 replies, as both ends see them (the requests are in `messages`).

Every header the server sends is one of the frozen classes below: the server
builds the value and sends `to_header()`; the client gets the same value back
from `parse_reply`, which checks each field's type, and reads attributes.
A reply echoes its request's `id` (`rid`); the replies of a get say which
event they are about (`seq`, `event`) and whether more follow (`done`).

Which class a header is depends on the request it answers, so the client
passes the requests waiting for replies to `parse_reply`; an error (`ok:
false`) answers any request, and `id` -1 when the request had no usable id.

Where a frame's bytes are is one union, `Where`: `InPool`, an extent of
the server's pool that the client holds until it releases `handle` (a
frame of its own, or a frame-cache entry: the client need not know which),
or `Inline`, a payload of `nbytes` after the header. Frames a get wrote into
a batch buffer (`into`) are in that buffer: `ArenaWritten` lists them.

The checks are one class test per field: this is the path of every frame,
thousands a second.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple, Union

from .errors import BAD_FRAME, ProtocolError
from .messages import (Follow, FreeArenas, Get, Hello, Info, MakeArena, Ping, Prefetch,
                       Release, Request, Shutdown, Stats, request_id)

_MISSING = object()


def _want(header: Dict[str, Any], name: str, kind: Any, default: Any = _MISSING) -> Any:
    """A reply's field, of the type it must have (`default` when absent)."""
    value = header.get(name, _MISSING)
    if value.__class__ is kind:        # the usual case, decided at once
        return value
    if value is _MISSING:
        if default is _MISSING:
            raise ProtocolError(BAD_FRAME, f"bad reply from server: no field {name!r}")
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise ProtocolError(BAD_FRAME, f"bad reply from server: field {name!r} is {value!r}")
    return value


def _kinds(kind: Any) -> Tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


Spec = Tuple[Tuple[str, Any, Any], ...]     # (name, type, default) of each field


def _take(header: Dict[str, Any], spec: Spec) -> Any:
    """Several fields at once, as `_want` checks them (the per-frame path)."""
    values = []
    for name, kind, default in spec:
        value = header.get(name, default)
        if value.__class__ is not kind and (value is not default or default is _MISSING):
            value = _want(header, name, kind, default)
        values.append(value)
    return values


def _ints(header: Dict[str, Any], name: str) -> Tuple[int, ...]:
    values = _want(header, name, list)
    for v in values:
        if v.__class__ is not int:
            raise ProtocolError(BAD_FRAME, f"bad reply from server: {name} must be integers")
    return tuple(values)


def _reply_header(rid: int, ok: bool = True) -> Dict[str, Any]:
    return {"ok": ok, "id": rid}


_DESC = frozenset(("shape", "dtype", "timestamp", "calibrated"))


@dataclass(frozen=True)
class FrameDesc:
    """What a reply says about a frame besides where its bytes are: shape,
    dtype (numpy's `dtype.str`), timestamp, whether it is calibrated, and
    anything else its source or request adds (`values` of fields)."""
    shape: Tuple[int, ...]
    dtype: str
    timestamp: Any = None         # as the source gives it: {"time": ...}, or None
    calibrated: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> Dict[str, Any]:
        """The fields the get named, each `{data, dtype, shape}`."""
        return self.extra.get("values", {})

    def to_fields(self) -> Dict[str, Any]:
        fields = {"shape": list(self.shape), "dtype": self.dtype, "timestamp": self.timestamp,
                  "calibrated": self.calibrated}
        fields.update(self.extra)
        return fields

    @classmethod
    def from_fields(cls, header: Dict[str, Any], taken: FrozenSet[str] = _DESC) -> "FrameDesc":
        """From a header or a stored descriptor; every key not `taken` (the
        frame's own, and those of the reply around it) goes to `extra`."""
        dtype, calibrated = _take(header, _DESC_SPEC)
        others = header.keys() - taken
        return cls(_ints(header, "shape"), dtype, header.get("timestamp"), calibrated,
                   {k: v for k, v in header.items() if k in others} if others else {})


_DESC_SPEC: Spec = (("dtype", str, _MISSING), ("calibrated", bool, True))
_WRITTEN = _DESC | {"seq", "event"}


@dataclass(frozen=True)
class ErrorReply:
    """A request failed (`code` from `errors`). The failure of one event of a
    get says which (`seq`, `event`) and whether the get goes on (`done`)."""
    rid: int
    code: str
    message: str
    done: Optional[bool] = None
    seq: Optional[int] = None
    event: Optional[int] = None

    @property
    def last(self) -> bool:
        return self.done is not False

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid, ok=False)
        header["code"] = self.code
        header["message"] = self.message
        for name in ("done", "seq", "event"):
            value = getattr(self, name)
            if value is not None:
                header[name] = value
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> "ErrorReply":
        return cls(request_id(h), _want(h, "code", str), _want(h, "message", str),
                   _want(h, "done", bool, None), _want(h, "seq", int, None),
                   _want(h, "event", int, None))


class _Flat:
    """A reply whose header is `ok`, `id`, its fields by name (`_KINDS`: name
    and type, in header order), then the flags it always sets (`_FLAGS`).
    A field added in a later release has a default (`_SINCE`) for replies of
    servers that do not send it."""
    rid: int
    _KINDS: Dict[str, Any] = {}
    _FLAGS: Tuple[str, ...] = ()
    _SINCE: Dict[str, Any] = {}
    last = True

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid)
        header.update((name, getattr(self, name)) for name in self._KINDS)
        header.update((flag, True) for flag in self._FLAGS)
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> Any:
        for flag in cls._FLAGS:
            _want(h, flag, bool)
        return cls(request_id(h), *(_want(h, name, kind, cls._SINCE.get(name, _MISSING))
                                    for name, kind in cls._KINDS.items()))


@dataclass(frozen=True)
class Welcome(_Flat):
    """The answer to hello: what the connection agreed on, and who serves it."""
    rid: int
    version: int
    transport: str
    window: int
    source: str
    worker: int           # the pid of the worker serving this connection
    group: str            # the connection group id (batch buffers)
    door: str             # the abstract UNIX socket handing out the pools ("" inline)
    workers: int = 0      # how many workers the server has (0: a server that does not say)

    _KINDS = {"version": int, "transport": str, "window": int, "source": str, "worker": int,
              "group": str, "door": str, "workers": int}
    _SINCE = {"workers": 0}


@dataclass(frozen=True)
class InfoReply:
    """What the source says about a run or a detector (see `FrameReader.info`)."""
    rid: int
    info: Dict[str, Any]

    last = True

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid)
        header.update(self.info)
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> "InfoReply":
        return cls(request_id(h), {k: v for k, v in h.items() if k not in _ENVELOPE})


@dataclass(frozen=True)
class Queued(_Flat):
    """A prefetch taken: how many events will be read ahead."""
    rid: int
    queued: int

    _KINDS = {"queued": int}
    _FLAGS = ("done",)


@dataclass(frozen=True)
class Pong(_Flat):
    rid: int

    _FLAGS = ("pong",)


@dataclass(frozen=True)
class StatsReply(_Flat):
    rid: int
    stats: Dict[str, Any]

    _KINDS = {"stats": dict}


@dataclass(frozen=True)
class Stopping(_Flat):
    """A shutdown accepted: the server stops."""
    rid: int

    _FLAGS = ("stopping",)


@dataclass(frozen=True)
class ArenaMade(_Flat):
    """A batch buffer of the connection's group: `size` bytes at `offset` of
    pool `pool`, named by its ticket `arena` (see protocol.pool)."""
    rid: int
    arena: int
    pool: int
    offset: int
    size: int

    _KINDS = {"arena": int, "pool": int, "offset": int, "size": int}


@dataclass(frozen=True)
class Skipped:
    """An event of a `skip_incomplete` get that lacks a detector: no frame."""
    rid: int
    seq: int
    event: int
    message: str
    done: bool

    @property
    def last(self) -> bool:
        return self.done

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid)
        header.update(seq=self.seq, event=self.event, skipped=True, message=self.message,
                      done=self.done)
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> "Skipped":
        return cls(request_id(h), _want(h, "seq", int), _want(h, "event", int),
                   _want(h, "message", str), _want(h, "done", bool))


@dataclass(frozen=True)
class InPool:
    """A frame in an extent of the server's pool (protocol.pool): `size`
    bytes at `offset` of pool `pool` with `ticket` at its end, held by the
    client until it releases `handle`."""
    handle: int
    pool: int
    offset: int
    size: int
    ticket: int


@dataclass(frozen=True)
class Inline:
    """A frame whose `nbytes` follow the header."""
    nbytes: int


Where = Union[InPool, Inline]


@dataclass(frozen=True)
class FrameReply:
    """One event's frame, and `where` its bytes are."""
    rid: int
    seq: int
    event: int
    done: bool
    desc: FrameDesc
    where: Where

    @property
    def last(self) -> bool:
        return self.done

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid)
        header.update(seq=self.seq, event=self.event, done=self.done)
        header.update(self.desc.to_fields())
        header.update(vars(self.where))
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> "FrameReply":
        seq, event, done, nbytes = _take(h, _FRAME_SPEC)
        where = Inline(nbytes) if nbytes is not None else InPool(*_take(h, _IN_POOL_SPEC))
        return cls(request_id(h), seq, event, done, FrameDesc.from_fields(h, _FRAME_REPLY), where)


_FRAME_SPEC: Spec = (("seq", int, _MISSING), ("event", int, _MISSING), ("done", bool, _MISSING),
                     ("nbytes", int, None))
_IN_POOL_SPEC: Spec = tuple((name, int, _MISSING) for name in InPool.__dataclass_fields__)


@dataclass(frozen=True)
class WrittenFrame:
    """One frame a get wrote into a batch arena."""
    seq: int
    event: int
    desc: FrameDesc

    def to_fields(self) -> Dict[str, Any]:
        fields = {"seq": self.seq, "event": self.event}
        fields.update(self.desc.to_fields())
        return fields

    @classmethod
    def from_fields(cls, f: Any) -> "WrittenFrame":
        if not isinstance(f, dict):
            raise ProtocolError(BAD_FRAME, "bad reply from server: frames must be objects")
        return cls(_want(f, "seq", int), _want(f, "event", int),
                   FrameDesc.from_fields(f, _WRITTEN))


@dataclass(frozen=True)
class ArenaWritten:
    """Every frame of a get into a batch buffer is there (one reply per get)."""
    rid: int
    arena: int
    frames: Tuple[WrittenFrame, ...]

    last = True

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid)
        header.update(done=True, arena=self.arena, frames=[f.to_fields() for f in self.frames])
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> "ArenaWritten":
        return cls(request_id(h), _want(h, "arena", int),
                   tuple(WrittenFrame.from_fields(f) for f in _want(h, "frames", list)))


@dataclass(frozen=True)
class RunProgress:
    """The answer to follow: the detector's events past the one asked
    (`events`, in order), how many of its events come before the first of
    them (`position`) and how many there are so far (`held`); the run's
    events so far, whether it may still grow (`live`), why it cannot
    (`ended`: "end_run", "renamed", "finished"; "" while live), the seconds
    since it last grew (`idle`), and the experiment's next run with data
    when asked (`next_run`, -1 for none)."""
    rid: int
    events: Tuple[int, ...]
    position: int
    held: int
    run_events: int
    live: bool
    ended: str
    idle: float
    next_run: int = -1

    last = True

    def to_header(self) -> Dict[str, Any]:
        header = _reply_header(self.rid)
        header.update(events=list(self.events), position=self.position, held=self.held,
                      run_events=self.run_events, live=self.live, ended=self.ended,
                      idle=self.idle, next_run=self.next_run)
        return header

    @classmethod
    def from_header(cls, h: Dict[str, Any]) -> "RunProgress":
        return cls(request_id(h), _ints(h, "events"), _want(h, "position", int),
                   _want(h, "held", int), _want(h, "run_events", int), _want(h, "live", bool),
                   _want(h, "ended", str), float(_want(h, "idle", (int, float))),
                   _want(h, "next_run", int))


Reply = Union[ErrorReply, Welcome, InfoReply, Queued, Pong, StatsReply, Stopping, ArenaMade,
              Skipped, FrameReply, ArenaWritten, RunProgress]
_ENVELOPE = frozenset(("ok", "id"))
_FRAME_REPLY = _ENVELOPE | _DESC | {"seq", "event", "done", "nbytes"} \
    | set(InPool.__dataclass_fields__)


def _get_reply(h: Dict[str, Any], request: Get) -> Reply:
    if request.into is not None:
        return ArenaWritten.from_header(h)
    if h.get("skipped"):
        return Skipped.from_header(h)
    return FrameReply.from_header(h)


_PARSERS = {
    Hello: Welcome.from_header,
    Info: InfoReply.from_header,
    Prefetch: Queued.from_header,
    MakeArena: ArenaMade.from_header,
    Ping: Pong.from_header,
    Stats: StatsReply.from_header,
    Shutdown: Stopping.from_header,
    Follow: RunProgress.from_header,
}
NO_REPLY = (Release, FreeArenas)     # answered only when they fail


def parse_reply(header: Dict[str, Any], waiting: Mapping[int, Request]) -> Reply:
    """The reply in a decoded header to one of the requests `waiting` for
    replies (by id); ProtocolError if it is not one. An error may answer any
    id, also one not waiting (a release, or -1)."""
    if _want(header, "ok", bool) is False:
        return ErrorReply.from_header(header)
    request = waiting.get(request_id(header))
    if isinstance(request, Get):
        return _get_reply(header, request)
    parser = _PARSERS.get(type(request))
    if parser is None:
        raise ProtocolError(BAD_FRAME, f"bad reply from server: a reply to request "
                                       f"{request_id(header)}, which waits for none")
    return parser(header)
