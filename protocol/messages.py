"""v1 requests and replies. Requests are validated on construction, so a
handler only ever sees well-typed values; replies are plain header dicts
(`ok_reply`, `error_reply`), as are the requests a client sends
(`encode_request`, `hello_request`).

Every request carries an integer `id` that its replies echo, which is what
makes pipelining possible. `parse_request` turns a decoded header into one of
the frozen request classes below or raises `ProtocolError`.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from . import PROTOCOL_VERSION
from .errors import BAD_REQUEST, UNKNOWN_MODE, UNKNOWN_OP, ProtocolError

MODES = ("raw", "calib", "image", "mask")
TRANSPORTS = ("shm", "inline")
MAX_EVENTS_PER_GET = 4096
MAX_NAME = 256


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


@dataclass(frozen=True)
class Hello:
    version: int
    token: Optional[str] = None
    host: str = ""
    transport: str = "shm"
    window: int = 0          # 0: the server's default

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ProtocolError(BAD_REQUEST, f"transport must be one of {TRANSPORTS}")
        if self.window < 0:
            raise ProtocolError(BAD_REQUEST, "window must be >= 0")


@dataclass(frozen=True)
class RunKey:
    """Which data: one detector of one run, as every source addresses it."""
    exp: str
    run: int
    detector: str
    access_mode: str = "idx"


@dataclass(frozen=True)
class Info:
    exp: str
    run: int
    detector: Optional[str] = None


@dataclass(frozen=True)
class Get:
    key: RunKey
    mode: str
    events: Tuple[int, ...]

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if not self.events:
            raise ProtocolError(BAD_REQUEST, "events must not be empty")
        if len(self.events) > MAX_EVENTS_PER_GET:
            raise ProtocolError(BAD_REQUEST, f"at most {MAX_EVENTS_PER_GET} events per get")
        for e in self.events:
            check_event(e)


@dataclass(frozen=True)
class Release:
    slots: Tuple[int, ...]


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Stats:
    pass


@dataclass(frozen=True)
class Shutdown:
    token: Optional[str] = None


Request = Union[Hello, Info, Get, Release, Ping, Stats, Shutdown]


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


def _get(h: Dict[str, Any]) -> Get:
    if "event" in h and "events" not in h:
        events = (check_event(h["event"]),)
    else:
        events = _int_list(h, "events")
    key = RunKey(_field(h, "exp", str), _field(h, "run", int), _field(h, "detector", str),
                 _field(h, "access_mode", str, "idx"))
    return Get(key, _field(h, "mode", str, "calib"), events)


_PARSERS = {
    "hello": lambda h: Hello(_field(h, "version", int), _field(h, "token", str, None),
                             _field(h, "host", str, ""), _field(h, "transport", str, "shm"),
                             _field(h, "window", int, 0)),
    "info": lambda h: Info(_field(h, "exp", str), _field(h, "run", int),
                           _field(h, "detector", str, None)),
    "get": _get,
    "release": lambda h: Release(_int_list(h, "slots")),
    "ping": lambda h: Ping(),
    "stats": lambda h: Stats(),
    "shutdown": lambda h: Shutdown(_field(h, "token", str, None)),
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


def encode_request(op: str, rid: int, **fields: Any) -> Dict[str, Any]:
    """The header a client sends; `None` fields are left out."""
    header = {"op": op, "id": rid}
    header.update({k: v for k, v in fields.items() if v is not None})
    return header


def ok_reply(rid: int, **fields: Any) -> Dict[str, Any]:
    reply = {"ok": True, "id": rid}
    reply.update(fields)
    return reply


def error_reply(rid: int, code: str, message: str, **fields: Any) -> Dict[str, Any]:
    reply = {"ok": False, "id": rid, "code": code, "message": message}
    reply.update(fields)
    return reply


def hello_request(rid: int, host: str, transport: str, token: Optional[str] = None,
                  window: int = 0) -> Dict[str, Any]:
    return encode_request("hello", rid, version=PROTOCOL_VERSION, host=host,
                          transport=transport, token=token, window=window or None)
