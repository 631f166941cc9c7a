"""v1 requests, as both ends see them (the replies are in `replies`).

Each request is a frozen class, validated on construction, so a handler only
ever sees well-typed values and a client cannot send a malformed one. There
is one way to a header, `to_header(id)` (the client sends it), and one way
back, `parse_request` (the server reads it), which turns a decoded header
into the same value or raises `ProtocolError`. Every request carries an
integer `id` that its replies echo, which is what makes pipelining possible.
A frame's byte size, which both ends compute from a shape, is `frame_nbytes`.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .errors import BAD_ARENA, BAD_REQUEST, UNKNOWN_MODE, UNKNOWN_OP, ProtocolError

MODES = ("raw", "calib", "image", "mask", "waveforms", "padded")
TRANSPORTS = ("shm", "inline")
MAX_EVENTS_PER_GET = 4096
MAX_NAME = 256
MAX_FIELDS = 64
MAX_DIMS = 8
REDUCERS = ("sum", "list", "count")
MAX_CODES = 64
MAX_FOLLOWED = 2048     # events one answer to follow lists


def _field(header: Dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = header.get(name, default)
    if value is ...:
        raise ProtocolError(BAD_REQUEST, f"missing field {name!r}")
    if value is default and default is not ...:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {kind.__name__}")
    if kind is str and len(value) > MAX_NAME:
        raise ProtocolError(BAD_REQUEST, f"field {name!r} is longer than {MAX_NAME} characters")
    return value


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ProtocolError(UNKNOWN_MODE, f"mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


def check_event(event: Any) -> int:
    if not isinstance(event, int) or isinstance(event, bool) or event < 0:
        raise ProtocolError(BAD_REQUEST, f"event {event!r} must be a non-negative integer")
    return event


def check_events(mode: str, events: Tuple[int, ...], op: str) -> None:
    check_mode(mode)
    if not events:
        raise ProtocolError(BAD_REQUEST, "events must not be empty")
    if len(events) > MAX_EVENTS_PER_GET:
        raise ProtocolError(BAD_REQUEST, f"at most {MAX_EVENTS_PER_GET} events per {op}")
    for e in events:
        check_event(e)


def frame_nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a frame of this shape whose elements take `itemsize` bytes
    (Python integers: no overflow), as both ends size frames and arenas."""
    return math.prod(int(n) for n in shape) * itemsize


@dataclass(frozen=True)
class Hello:
    version: int
    token: Optional[str] = None
    host: str = ""
    transport: str = "shm"
    window: int = 0          # 0: the server's default
    group: Optional[str] = None   # a connection group id the server issued (batch arenas)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ProtocolError(BAD_REQUEST, f"transport must be one of {TRANSPORTS}")
        if self.window < 0:
            raise ProtocolError(BAD_REQUEST, "window must be >= 0")

    def to_header(self, rid: int) -> Dict[str, Any]:
        header = {"op": "hello", "id": rid, "version": self.version, "host": self.host,
                  "transport": self.transport}
        _optional(header, token=self.token, window=self.window or None, group=self.group)
        return header


@dataclass(frozen=True)
class RunKey:
    """Which data: one detector of one run, as every source addresses it."""
    exp: str
    run: int
    detector: str
    access_mode: str = "idx"


@dataclass(frozen=True)
class CodeFilter:
    """Events chosen by the timing system's event codes: those holding every
    code of `with_codes` and none of `without_codes` (e.g. laser on: with 40;
    laser off: without 40). On the wire {"with": [...], "without": [...]}."""
    with_codes: Tuple[int, ...] = ()
    without_codes: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        codes = self.with_codes + self.without_codes
        if not codes or len(codes) > MAX_CODES:
            raise ProtocolError(BAD_REQUEST, f"an event-code filter names 1 to {MAX_CODES} codes")
        for code in codes:
            if not isinstance(code, int) or isinstance(code, bool) or code < 0:
                raise ProtocolError(BAD_REQUEST, f"event code {code!r} must be a non-negative "
                                                 f"integer")
        if set(self.with_codes) & set(self.without_codes):
            raise ProtocolError(BAD_REQUEST, "an event code cannot be both asked for and "
                                             "left out")

    def to_json(self) -> Dict[str, Any]:
        return {"with": list(self.with_codes), "without": list(self.without_codes)}

    @classmethod
    def parse(cls, value: Any) -> "CodeFilter":
        """From the wire form, or from a user's {"with": [...], "without": [...]}."""
        if isinstance(value, CodeFilter):
            return value
        if not isinstance(value, dict) or not set(value) <= {"with", "without"}:
            raise ProtocolError(BAD_REQUEST, 'event codes must be given as {"with": [codes], '
                                             '"without": [codes]}')
        lists = []
        for key in ("with", "without"):
            codes = value.get(key, [])
            if not isinstance(codes, (list, tuple)):
                raise ProtocolError(BAD_REQUEST, f'event codes "{key}" must be a list of codes')
            lists.append(tuple(codes))
        return cls(*lists)


@dataclass(frozen=True)
class Info:
    exp: str
    run: int
    detector: Optional[str] = None
    present: bool = False    # also list which events hold each detector (as ranges)
    codes: Optional[CodeFilter] = None   # count and list only the events these codes choose

    def to_header(self, rid: int) -> Dict[str, Any]:
        header = {"op": "info", "id": rid, "exp": self.exp, "run": self.run}
        _optional(header, detector=self.detector, present=self.present or None,
                  codes=self.codes.to_json() if self.codes is not None else None)
        return header


@dataclass(frozen=True)
class Follow:
    """Where a run stands, and the events holding `detector` past event
    `after` (at most MAX_FOLLOWED of them; with `codes`, only those the event
    codes choose), answered at once: a client following a run as it is
    written asks again, past the last event it got. With `next_run`, the
    answer also names the experiment's next run that has data."""
    exp: str
    run: int
    detector: str
    after: int = -1
    codes: Optional[CodeFilter] = None
    next_run: bool = False

    def __post_init__(self) -> None:
        if self.after < -1:
            raise ProtocolError(BAD_REQUEST, "after must be an event index, or -1 for the "
                                             "run's start")

    def to_header(self, rid: int) -> Dict[str, Any]:
        header = {"op": "follow", "id": rid, "exp": self.exp, "run": self.run,
                  "detector": self.detector, "after": self.after}
        _optional(header, codes=self.codes.to_json() if self.codes is not None else None,
                  next_run=self.next_run or None)
        return header


@dataclass(frozen=True)
class FieldRef:
    """One per-event value of another detector of the run, named on the wire
    `detector.attribute` (psana's `det.raw.attribute(evt)`) or
    `detector.interface.attribute`: EBeam's `ebeam.ebeamPhotonEnergy`, a
    gas detector's `gasdet.f_11_ENRC`, a wave8's `wave8.raw_all`.

    With `reduce`, named `sum(...)`, `list(...)` or `count(...)`, it is the
    value over the events of a batch (an integrating detector's events end
    the batches): their sum, the values stacked, or how many events hold it."""
    detector: str
    attribute: str
    interface: str = "raw"
    reduce: Optional[str] = None

    def __post_init__(self) -> None:
        for part in (self.detector, self.interface, self.attribute):
            if not isinstance(part, str) or not part or "." in part or len(part) > MAX_NAME:
                raise ProtocolError(BAD_REQUEST, f"field {self.name!r} must be "
                                                 f"'detector.attribute' or "
                                                 f"'detector.interface.attribute'")
        if self.interface.startswith("_") or self.attribute.startswith("_"):
            raise ProtocolError(BAD_REQUEST, f"field {self.name!r}: private attributes "
                                             f"cannot be read")
        if self.reduce is not None and self.reduce not in REDUCERS:
            raise ProtocolError(BAD_REQUEST, f"field {self.name!r}: a batch's values are "
                                             f"{', '.join(r + '(...)' for r in REDUCERS)}")

    @property
    def plain(self) -> str:
        """The name of the value itself, without a reduction."""
        if self.interface == "raw":
            return f"{self.detector}.{self.attribute}"
        return f"{self.detector}.{self.interface}.{self.attribute}"

    @property
    def name(self) -> str:
        """The name a request gives and a reply's `values` uses."""
        return f"{self.reduce}({self.plain})" if self.reduce else self.plain

    @classmethod
    def parse(cls, text: Any) -> "FieldRef":
        if not isinstance(text, str):
            raise ProtocolError(BAD_REQUEST, "fields must be a list of strings")
        reduce = None
        head, paren, rest = text.partition("(")
        if paren and rest.endswith(")") and head.isidentifier():
            reduce, text = head, rest[:-1]     # an unknown reduction is refused below
        parts = text.split(".")
        if len(parts) == 2:
            return cls(parts[0], parts[1], reduce=reduce)
        if len(parts) == 3:
            return cls(parts[0], parts[2], parts[1], reduce)
        return cls(text, "", reduce=reduce)   # refused with the message above


@dataclass(frozen=True)
class Into:
    """Where a get's frames go instead of extents of their own: the batch
    buffer `arena` (its ticket) of the connection group, frame k at
    `offsets[k]` from its start, each of `shape` and `dtype` (checked by the
    server against the frame it reads before writing)."""
    arena: int
    offsets: Tuple[int, ...]
    shape: Tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if any(o < 0 for o in self.offsets):
            raise ProtocolError(BAD_ARENA, "arena offsets must be >= 0")
        if len(self.shape) > MAX_DIMS or any(n < 0 for n in self.shape):
            raise ProtocolError(BAD_ARENA, f"a frame shape has at most {MAX_DIMS} dimensions, "
                                           f"none negative")

    def to_header(self) -> Dict[str, Any]:
        return {"arena": self.arena, "offsets": list(self.offsets), "shape": list(self.shape),
                "dtype": self.dtype}


@dataclass(frozen=True)
class Get:
    """Events of one detector in one mode; with `fields`, each event's reply
    also carries those values of other detectors (`values`). With
    `skip_incomplete`, an event lacking the detector or a field's detector is
    answered `skipped` rather than with the error `no_data` (not with `into`:
    a skipped event would leave a row of the batch unwritten)."""
    key: RunKey
    mode: str
    events: Tuple[int, ...]
    fields: Tuple[FieldRef, ...] = ()
    skip_incomplete: bool = False
    into: Optional[Into] = None

    def __post_init__(self) -> None:
        check_events(self.mode, self.events, "get")
        if len(self.fields) > MAX_FIELDS:
            raise ProtocolError(BAD_REQUEST, f"at most {MAX_FIELDS} fields per get")
        if self.into is None:
            return
        if len(self.into.offsets) != len(self.events):
            raise ProtocolError(BAD_ARENA, "a get into an arena needs one offset per event")
        if self.skip_incomplete:
            raise ProtocolError(BAD_REQUEST, "a get into an arena takes no skip_incomplete")

    def to_header(self, rid: int) -> Dict[str, Any]:
        header = _events_header("get", rid, self.key, self.mode, self.events)
        _optional(header, fields=[f.name for f in self.fields] or None,
                  skip_incomplete=self.skip_incomplete or None,
                  into=self.into.to_header() if self.into is not None else None)
        return header


@dataclass(frozen=True)
class Prefetch:
    """A hint: these events of this detector will be asked for next, in this
    order. Idle workers read them into the frame cache; no frame is sent."""
    key: RunKey
    mode: str
    events: Tuple[int, ...]

    def __post_init__(self) -> None:
        check_events(self.mode, self.events, "prefetch")

    def get(self) -> Get:
        return Get(self.key, self.mode, self.events)

    def to_header(self, rid: int) -> Dict[str, Any]:
        return _events_header("prefetch", rid, self.key, self.mode, self.events)


@dataclass(frozen=True)
class MakeArena:
    """A batch buffer of at least `size` bytes for this connection's group (op
    `arena`): an idle one of the group's, else a new one; with `wait` false,
    `no_memory` at once when there is no room now rather than after waiting."""
    size: int
    wait: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ProtocolError(BAD_REQUEST, "an arena needs a size >= 1")

    def to_header(self, rid: int) -> Dict[str, Any]:
        header = {"op": "arena", "id": rid, "size": self.size}
        _optional(header, wait=None if self.wait else False)
        return header


@dataclass(frozen=True)
class Release:
    """Frames (their `handle`s) the client has done reading."""
    handles: Tuple[int, ...]

    def to_header(self, rid: int) -> Dict[str, Any]:
        return {"op": "release", "id": rid, "handles": list(self.handles)}


@dataclass(frozen=True)
class Ping:
    def to_header(self, rid: int) -> Dict[str, Any]:
        return {"op": "ping", "id": rid}


@dataclass(frozen=True)
class Stats:
    def to_header(self, rid: int) -> Dict[str, Any]:
        return {"op": "stats", "id": rid}


@dataclass(frozen=True)
class Shutdown:
    token: Optional[str] = None

    def to_header(self, rid: int) -> Dict[str, Any]:
        header = {"op": "shutdown", "id": rid}
        _optional(header, token=self.token)
        return header


@dataclass(frozen=True)
class FreeArenas:
    """Batch buffers (their tickets) the group no longer needs (op `free_arenas`)."""
    arenas: Tuple[int, ...]

    def to_header(self, rid: int) -> Dict[str, Any]:
        return {"op": "free_arenas", "id": rid, "arenas": list(self.arenas)}


Request = Union[Hello, Info, Get, Prefetch, MakeArena, FreeArenas, Release, Ping, Stats,
                Shutdown, Follow]


def _optional(header: Dict[str, Any], **fields: Any) -> None:
    """Fields a header leaves out when they are None (their defaults)."""
    header.update((k, v) for k, v in fields.items() if v is not None)


def _events_header(op: str, rid: int, key: RunKey, mode: str,
                   events: Tuple[int, ...]) -> Dict[str, Any]:
    return {"op": op, "id": rid, "exp": key.exp, "run": key.run, "detector": key.detector,
            "mode": mode, "events": list(events), "access_mode": key.access_mode}


def request_id(header: Dict[str, Any]) -> int:
    """The request's id, or -1 when it has none usable (still worth an error reply)."""
    rid = header.get("id")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else -1


def _int_list(header: Dict[str, Any], name: str) -> Tuple[int, ...]:
    values = _field(header, name, list)
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ProtocolError(BAD_REQUEST, f"{name} must be a list of integers")
    return tuple(values)


def _events_of(h: Dict[str, Any]) -> Tuple[RunKey, str, Tuple[int, ...]]:
    """Key, mode and events of a get or a prefetch."""
    if "event" in h and "events" not in h:
        events = (check_event(h["event"]),)
    else:
        events = _int_list(h, "events")
    key = RunKey(_field(h, "exp", str), _field(h, "run", int), _field(h, "detector", str),
                 _field(h, "access_mode", str, "idx"))
    return key, _field(h, "mode", str, "calib"), events


def _get(h: Dict[str, Any]) -> Get:
    key, mode, events = _events_of(h)
    fields = tuple(FieldRef.parse(f) for f in _field(h, "fields", list, []))
    return Get(key, mode, events, fields,
               _field(h, "skip_incomplete", bool, False), _into(h))


def _codes(h: Dict[str, Any]) -> Optional[CodeFilter]:
    codes = _field(h, "codes", dict, None)
    return None if codes is None else CodeFilter.parse(codes)


def _into(h: Dict[str, Any]) -> Optional[Into]:
    into = _field(h, "into", dict, None)
    if into is None:
        return None
    return Into(_field(into, "arena", int), _int_list(into, "offsets"), _int_list(into, "shape"),
                _field(into, "dtype", str))


_PARSERS = {
    "hello": lambda h: Hello(_field(h, "version", int), _field(h, "token", str, None),
                             _field(h, "host", str, ""), _field(h, "transport", str, "shm"),
                             _field(h, "window", int, 0), _field(h, "group", str, None)),
    "info": lambda h: Info(_field(h, "exp", str), _field(h, "run", int),
                           _field(h, "detector", str, None), _field(h, "present", bool, False),
                           _codes(h)),
    "get": _get,
    "prefetch": lambda h: Prefetch(*_events_of(h)),
    "arena": lambda h: MakeArena(_field(h, "size", int), _field(h, "wait", bool, True)),
    "free_arenas": lambda h: FreeArenas(_int_list(h, "arenas")),
    "release": lambda h: Release(_int_list(h, "handles")),
    "ping": lambda h: Ping(),
    "stats": lambda h: Stats(),
    "shutdown": lambda h: Shutdown(_field(h, "token", str, None)),
    "follow": lambda h: Follow(_field(h, "exp", str), _field(h, "run", int),
                               _field(h, "detector", str), _field(h, "after", int, -1), _codes(h),
                               _field(h, "next_run", bool, False)),
}


def parse_request(header: Dict[str, Any]) -> Tuple[int, Request]:
    """Validate a decoded header; returns (id, request) or raises ProtocolError."""
    op = header.get("op")
    parser = _PARSERS.get(op) if isinstance(op, str) else None
    if parser is None:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r}; expected one of {', '.join(_PARSERS)}")
    rid = request_id(header)
    if rid < 0:
        raise ProtocolError(BAD_REQUEST, "field 'id' must be a non-negative integer")
    return rid, parser(header)
