"""v1 framing: a 4-byte big-endian header length, a UTF-8 JSON object, and an
optional binary payload of `header["nbytes"]` bytes.

`FrameDecoder` is the one reader of this framing, for both ends. It follows
h11's reader contract: feed bytes with `receive_data`, then call
`next_frame` until it returns `None` (need more data). A blocking reader
that wants a large payload in its own memory (the client, with `recv_into`)
takes the steps one at a time instead: `missing` bytes until `next_header`
gives the header and the payload's size, then `take_payload` hands over
what was buffered of the payload and leaves the rest to be received
straight into that memory. It raises `ProtocolError` on bad input and stays
broken afterwards, so a caller cannot go on reading a desynchronised stream.
The header length is checked before anything is buffered.
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


class Head(NamedTuple):
    """A frame's header, and the size of the payload that follows it."""
    header: Dict[str, Any]
    size: int


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
    # no deeper than it has brackets: most headers need no walk (the path of every frame)
    openers = body.count(b"{") + body.count(b"[")
    if openers > MAX_JSON_DEPTH and _depth(header) > MAX_JSON_DEPTH:
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
        self._length: Optional[int] = None    # the next header's, once its prefix is checked
        self._head: Optional[Head] = None     # a header whose payload is not taken yet
        self._error: Optional[ProtocolError] = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def missing(self) -> int:
        """Bytes still to receive before `next_header` can return a header
        (read exactly these: nothing of the next frame is taken early). Only
        meaningful after `next_header` returned None."""
        if self._length is None:
            return LENGTH.size - len(self._buf)
        return LENGTH.size + self._length - len(self._buf)

    def next_header(self) -> Optional[Head]:
        """The next frame's header and payload size once the header is complete,
        or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._head is None:
            try:
                self._head = self._parse_head()
            except ProtocolError as e:
                self._error = e
                raise
        return self._head

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame, or None when more bytes are needed."""
        head = self.next_header()
        if head is None or len(self._buf) < head.size:
            return None
        payload = bytes(self._buf[: head.size]) if head.size else None
        del self._buf[: head.size]
        self._head = None
        return Frame(head.header, payload)

    def take_payload(self, into: memoryview) -> int:
        """Hand the payload of the header `next_header` gave to the caller: what
        is buffered of it is copied to the start of `into` (its size), the rest
        the caller receives itself. Returns the bytes copied."""
        if self._head is None or len(into) != self._head.size:
            raise ValueError("take_payload needs a header and memory of its payload's size")
        n = min(self._head.size, len(self._buf))
        into[:n] = self._buf[:n]
        del self._buf[:n]
        self._head = None
        return n

    def _parse_head(self) -> Optional[Head]:
        if self._length is None:
            if len(self._buf) < LENGTH.size:
                return None
            self._length = header_length(bytes(self._buf[: LENGTH.size]), self._max_header)
        end = LENGTH.size + self._length
        if len(self._buf) < end:
            return None
        header = decode_header(bytes(self._buf[LENGTH.size:end]))
        size = payload_size(header, self._max_payload)
        del self._buf[:end]
        self._length = None
        return Head(header, size)
