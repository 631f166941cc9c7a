"""The btx dialect: one JSON request per connection, no framing.

An old client sends `{exp, run, access_mode, detector_name, event, mode}`
with one `sendall` and reads the reply with one `recv(4096)`; `DONE` stops
the server and `ACK` confirms a segment was read. With no length prefix the
only way to know a request is complete is that it parses, so the server
buffers up to `MAX_LEGACY_REQUEST` bytes until it does.

Every reply of ours carries `SERVER_MARK`, which old btx servers never send:
that is how a client tells this server from an old one without a timeout.
A request with `PROBE_FIELD` set is answered at once with the mark alone (no
frame is read); an old server ignores the field and serves the frame.
Error replies carry what each btx-family client reads: `error` and
`traceback` (maxie), `code` and `message` (ours); for an event that cannot
be read, `legacy_missing_frame` adds a NaN frame (btx, pypca).
"""
import json
from typing import Any, Dict, Optional, Tuple, Union

from . import PROTOCOL_VERSION
from .errors import BAD_JSON, BAD_REQUEST, HEADER_TOO_LARGE, ProtocolError
from .messages import Get, RunKey, check_event

DONE = b"DONE"
ACK = b"ACK"
MAX_LEGACY_REQUEST = 4096
SERVER_MARK = "psana_ipc"     # value: the v1 protocol version the server also speaks
PROBE_FIELD = "psana_ipc_probe"


class Done:
    """The shutdown word of the old protocol."""


class Probe:
    """A client asking which server this is (see PROBE_FIELD)."""


def is_v1(first_byte: int) -> bool:
    """v1 starts with a length prefix below 16 MiB, so its first byte is 0;
    a legacy request starts with `{` or `DONE`."""
    return first_byte == 0


def parse_legacy(buf: bytes) -> Optional[Union[Get, Done, Probe]]:
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
        return Probe()
    return legacy_get(obj)


def legacy_get(obj: Any) -> Get:
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a JSON object")
    try:
        exp, run, det = obj["exp"], obj["run"], obj["detector_name"]
    except KeyError as e:
        raise ProtocolError(BAD_REQUEST, f"missing field {e.args[0]!r}") from None
    if isinstance(run, str) and run.isascii() and run.isdigit():
        run = int(run)
    if not isinstance(exp, str) or not isinstance(det, str) or not isinstance(run, int) \
            or isinstance(run, bool):
        raise ProtocolError(BAD_REQUEST, "exp and detector_name must be strings, run an integer")
    access = obj.get("access_mode") or "idx"
    mode = obj.get("mode") or "calib"
    if not isinstance(access, str) or not isinstance(mode, str):
        raise ProtocolError(BAD_REQUEST, "access_mode and mode must be strings")
    return Get(RunKey(exp, run, det, access), mode, (check_event(obj.get("event")),))


def legacy_reply(name: str, shape: Tuple[int, ...], dtype: str, **extra: Any) -> bytes:
    """What an old client `json.loads` from its single recv."""
    reply: Dict[str, Any] = {"name": name, "shape": list(shape), "dtype": dtype,
                             SERVER_MARK: PROTOCOL_VERSION}
    reply.update(extra)
    return json.dumps(reply).encode("utf-8")


def legacy_probe_reply() -> bytes:
    return json.dumps({SERVER_MARK: PROTOCOL_VERSION}).encode("utf-8")


def _error_fields(code: str, message: str) -> Dict[str, Any]:
    return {"error": message, "code": code, "message": message,
            "traceback": f"{code}: {message}", SERVER_MARK: PROTOCOL_VERSION}


def legacy_error(code: str, message: str) -> bytes:
    """An error every btx-family client can read (there is no frame to send)."""
    return json.dumps(_error_fields(code, message)).encode("utf-8")


def legacy_missing_frame(name: str, shape: Tuple[int, ...], code: str, message: str) -> bytes:
    """An event that cannot be read: a float32 NaN frame in segment `name`, as
    btx's server sends, with the error beside it for clients that read one."""
    reply: Dict[str, Any] = {"name": name, "shape": list(shape), "dtype": "float32"}
    reply.update(_error_fields(code, message))
    return json.dumps(reply).encode("utf-8")


def is_ours(reply: Dict[str, Any]) -> bool:
    """Whether a legacy reply came from this server (which also speaks v1)."""
    return reply.get(SERVER_MARK) == PROTOCOL_VERSION
