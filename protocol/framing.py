"""v1 framing: a 4-byte big-endian header length, a UTF-8 JSON object, and an
optional binary payload of `header["nbytes"]` bytes.

`FrameDecoder` follows h11's reader contract: feed bytes with
`receive_data`, then call `next_frame` until it returns `None` (need more
data). It raises `ProtocolError` on bad input and stays broken afterwards, so
a caller cannot go on reading a desynchronised stream. The header length is
checked before anything is buffered.
"""
import json
import struct
from typing import Any, Dict, NamedTuple, Optional

from .errors import BAD_FRAME, BAD_JSON, HEADER_TOO_LARGE, ProtocolError

LENGTH = struct.Struct(">I")
MAX_HEADER = 64 * 1024          # a v1 header is a small JSON object
MAX_JSON_DEPTH = 32


class Frame(NamedTuple):
    header: Dict[str, Any]
    payload: Optional[bytes]


def encode_frame(header: Dict[str, Any]) -> bytes:
    """Length prefix plus JSON header; a payload, if any, is sent after it."""
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return LENGTH.pack(len(body)) + body


def header_length(prefix: bytes, limit: int = MAX_HEADER) -> int:
    """Decode and bound-check a 4-byte length prefix."""
    (n,) = LENGTH.unpack(prefix)
    if n > limit:
        raise ProtocolError(HEADER_TOO_LARGE, f"header of {n} bytes exceeds the limit of {limit}")
    if n == 0:
        raise ProtocolError(BAD_FRAME, "empty header")
    return n


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(obj, dict):
        return max([_depth(v, level + 1) for v in obj.values()], default=level)
    if isinstance(obj, list):
        return max([_depth(v, level + 1) for v in obj], default=level)
    return level


def decode_header(body: bytes) -> Dict[str, Any]:
    """Parse a header body into a dict, rejecting non-objects and deep nesting."""
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(BAD_JSON, f"header is not UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError(BAD_JSON, "header must be a JSON object")
    if _depth(header) > MAX_JSON_DEPTH:
        raise ProtocolError(BAD_JSON, f"header nests deeper than {MAX_JSON_DEPTH}")
    return header


def payload_size(header: Dict[str, Any], limit: int) -> int:
    n = header.get("nbytes", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > limit:
        raise ProtocolError(BAD_FRAME, f"nbytes must be an integer in [0, {limit}]")
    return n


class FrameDecoder:
    """Incremental decoder of v1 frames from a byte stream (no I/O)."""

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = 0) -> None:
        self._buf = bytearray()
        self._max_header = max_header
        self._max_payload = max_payload
        self._error: Optional[ProtocolError] = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as e:
            self._error = e
            raise

    def _next(self) -> Optional[Frame]:
        if len(self._buf) < LENGTH.size:
            return None
        n = header_length(bytes(self._buf[: LENGTH.size]), self._max_header)
        end = LENGTH.size + n
        if len(self._buf) < end:
            return None
        header = decode_header(bytes(self._buf[LENGTH.size:end]))
        size = payload_size(header, self._max_payload)
        if len(self._buf) < end + size:
            return None
        payload = bytes(self._buf[end:end + size]) if size else None
        del self._buf[: end + size]
        return Frame(header, payload)
