"""The btx dialect: one JSON request per connection, no framing.

An old client sends `{exp, run, access_mode, detector_name, event, mode}`
(`LegacyGet`) with one `sendall` and reads the reply with one `recv(4096)`;
`DONE` stops the server and `ACK` confirms a segment was read (bare words).
With no length prefix the only way to know a message is complete is that it
parses, so each side buffers until it does: `parse_legacy` (the server, up
to `MAX_LEGACY_REQUEST` bytes) and `parse_legacy_reply` (the client).

Every reply of ours carries `SERVER_MARK`, which old btx servers never send
(`marked`): that is how a client tells this server from an old one without a
timeout. A request with `PROBE_FIELD` set (`Probe`) is answered at once with
the mark alone (`LegacyMark`, no frame is read); an old server ignores the
field and serves the frame. A frame's reply is `LegacyFrame`. Error replies
(`LegacyError`) carry what each btx-family client reads: `error` and
`traceback` (maxie), `code` and `message` (ours); for an event that cannot
be read, a NaN float32 frame beside them (btx, pypca).

Each message is a frozen class with one way to bytes (`to_bytes`) and one
way back; the bytes are what btx-family peers have always exchanged.
"""
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from . import PROTOCOL_VERSION
from .errors import BAD_JSON, BAD_REQUEST, HEADER_TOO_LARGE, INTERNAL, ProtocolError
from .messages import Get, RunKey, check_event, check_mode

DONE = b"DONE"
ACK = b"ACK"
MAX_LEGACY_REQUEST = 4096
SERVER_MARK = "psana_ipc"     # value: the v1 protocol version the server also speaks
PROBE_FIELD = "psana_ipc_probe"
NAN_DTYPE = "float32"         # the dtype of the frame an unreadable event is answered with


def _dumps(obj: Dict[str, Any]) -> bytes:
    """As btx-family peers write JSON (the default separators)."""
    return json.dumps(obj).encode("utf-8")


# -- requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LegacyGet:
    """One event's frame. `run` goes on the wire as the caller gave it (btx
    lists hold integers or digit strings); `get` is the request served."""
    exp: str
    run: Union[int, str]
    detector_name: str
    event: int
    access_mode: str = "idx"
    mode: str = "calib"

    def __post_init__(self) -> None:
        if not isinstance(self.exp, str) or not isinstance(self.detector_name, str) \
                or not _run_number(self.run):
            raise ProtocolError(BAD_REQUEST, "exp and detector_name must be strings, "
                                             "run an integer")
        if not (isinstance(self.access_mode, str) and isinstance(self.mode, str)
                and self.access_mode and self.mode):
            raise ProtocolError(BAD_REQUEST, "access_mode and mode must be strings")
        check_event(self.event)
        check_mode(self.mode)

    @property
    def get(self) -> Get:
        return Get(RunKey(self.exp, int(self.run), self.detector_name, self.access_mode),
                   self.mode, (self.event,))

    def fields(self) -> Dict[str, Any]:
        return {"exp": self.exp, "run": self.run, "access_mode": self.access_mode,
                "detector_name": self.detector_name, "event": self.event, "mode": self.mode}

    def to_bytes(self) -> bytes:
        return _dumps(self.fields())


def _run_number(run: Any) -> bool:
    if isinstance(run, str):
        return run.isascii() and run.isdigit()
    return isinstance(run, int) and not isinstance(run, bool)


@dataclass(frozen=True)
class Probe:
    """A client asking which server this is (see PROBE_FIELD), with the
    request an old server would serve instead; None when it is not one this
    server could serve (the mark answers it all the same)."""
    request: Optional[LegacyGet]

    def to_bytes(self) -> bytes:
        fields = self.request.fields() if self.request is not None else {}
        fields[PROBE_FIELD] = True
        return _dumps(fields)


@dataclass(frozen=True)
class Done:
    """The shutdown word of the old protocol."""

    def to_bytes(self) -> bytes:
        return DONE


LegacyRequest = Union[LegacyGet, Probe, Done]


def is_v1(first_byte: int) -> bool:
    """v1 starts with a length prefix below 16 MiB, so its first byte is 0;
    a legacy request starts with `{` or `DONE`."""
    return first_byte == 0


def parse_legacy(buf: bytes) -> Optional[LegacyRequest]:
    """A complete legacy request from the bytes so far, or None if incomplete.
    More than MAX_LEGACY_REQUEST bytes is an error whatever they are (even
    whitespace), so nothing buffers without bound."""
    if len(buf) > MAX_LEGACY_REQUEST:
        raise ProtocolError(HEADER_TOO_LARGE, f"legacy request over {MAX_LEGACY_REQUEST} bytes")
    text = buf.strip()
    if text == DONE:
        return Done()
    if DONE.startswith(text):
        return None
    try:
        text_str = buf.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(BAD_JSON, "request is not UTF-8") from e
    try:
        obj = json.loads(text_str)
    except RecursionError as e:
        raise ProtocolError(BAD_JSON, "request nests too deeply") from e
    except json.JSONDecodeError as e:
        if e.pos >= len(text_str.rstrip()) or e.msg.startswith("Unterminated string"):
            return None      # the text so far is a prefix of valid JSON: wait for more
        raise ProtocolError(BAD_JSON, f"request is not JSON: {e.msg}") from None
    if isinstance(obj, dict) and obj.get(PROBE_FIELD) is True:
        try:
            return Probe(legacy_get(obj))
        except ProtocolError:
            return Probe(None)
    return legacy_get(obj)


def legacy_get(obj: Any) -> LegacyGet:
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a JSON object")
    try:
        exp, run, det = obj["exp"], obj["run"], obj["detector_name"]
    except KeyError as e:
        raise ProtocolError(BAD_REQUEST, f"missing field {e.args[0]!r}") from None
    return LegacyGet(exp, run, det, obj.get("event"), obj.get("access_mode") or "idx",
                     obj.get("mode") or "calib")


# -- replies -------------------------------------------------------------------------------
def _mark(fields: Dict[str, Any], marked: bool) -> Dict[str, Any]:
    if marked:
        fields[SERVER_MARK] = PROTOCOL_VERSION
    return fields


@dataclass(frozen=True)
class LegacyFrame:
    """The frame is in segment `name`. Ours adds its mark, the timestamp and
    whether it is calibrated; an old server sends the first three alone."""
    name: str
    shape: Tuple[int, ...]
    dtype: str
    timestamp: Any = None
    calibrated: Optional[bool] = None
    marked: bool = True

    def to_bytes(self) -> bytes:
        fields = _mark({"name": self.name, "shape": list(self.shape), "dtype": self.dtype},
                       self.marked)
        if self.marked:
            fields.update(timestamp=self.timestamp, calibrated=self.calibrated)
        return _dumps(fields)


@dataclass(frozen=True)
class LegacyError:
    """An error every btx-family client can read; for an event that cannot be
    read (`nan_frame`), beside a float32 NaN frame of `shape` in segment
    `name`, as btx's server sends, so clients that filter NaNs go on."""
    code: str
    message: str
    name: Optional[str] = None
    shape: Optional[Tuple[int, ...]] = None
    marked: bool = True

    def __post_init__(self) -> None:
        if (self.name is None) != (self.shape is None):
            raise ProtocolError(BAD_REQUEST, "a NaN frame needs both its segment and its shape")

    @property
    def nan_frame(self) -> bool:
        return self.name is not None

    def to_bytes(self) -> bytes:
        fields: Dict[str, Any] = {}
        if self.nan_frame:
            fields.update(name=self.name, shape=list(self.shape), dtype=NAN_DTYPE)
        fields.update(error=self.message, code=self.code, message=self.message,
                      traceback=f"{self.code}: {self.message}")
        return _dumps(_mark(fields, self.marked))


@dataclass(frozen=True)
class LegacyMark:
    """The answer to a probe: the mark alone."""
    marked = True

    def to_bytes(self) -> bytes:
        return _dumps(_mark({}, True))


LegacyReply = Union[LegacyFrame, LegacyError, LegacyMark]


def parse_legacy_reply(buf: bytes) -> Optional[LegacyReply]:
    """The reply in the bytes received so far, ours or an old server's; None
    while they do not parse (more is coming); ProtocolError when they parse
    and are no reply."""
    try:
        obj = json.loads(buf.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, f"the legacy server answered {obj!r}")
    marked = obj.get(SERVER_MARK) == PROTOCOL_VERSION
    if marked and len(obj) == 1:
        return LegacyMark()
    if "error" in obj or "name" not in obj:
        nan_frame = "error" in obj and "name" in obj
        return LegacyError(_text(obj.get("code", INTERNAL)),
                           _text(obj.get("message", str(obj.get("error", obj)))),
                           _text(obj["name"]) if nan_frame else None,
                           _shape(obj) if nan_frame else None, marked)
    return LegacyFrame(_text(obj["name"]), _shape(obj), _text(obj.get("dtype")),
                       obj.get("timestamp"), obj.get("calibrated"), marked)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(BAD_JSON, f"the legacy server answered {value!r} for a string")
    return value


def _shape(obj: Dict[str, Any]) -> Tuple[int, ...]:
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                              and n >= 0 for n in shape):
        raise ProtocolError(BAD_JSON, f"the legacy server answered the shape {shape!r}")
    return tuple(shape)


def is_ours(reply: Any) -> bool:
    """Whether a legacy reply (None: there was none) came from this server,
    which also speaks v1."""
    return isinstance(reply, (LegacyFrame, LegacyError, LegacyMark)) and reply.marked
