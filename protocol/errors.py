"""Error codes and exception types shared by both ends of a connection.

A `ProtocolError` is what the peer did wrong (we received something bad, or
were about to send it), with the code to reply with; a `ServerError` is a
well-formed error reply the server sent on purpose, as the client raises it.
"""
from typing import Any

# One name per failure a user can act on; the server puts it in `code`.
BAD_FRAME = "bad_frame"              # framing broken: length prefix, encoding
HEADER_TOO_LARGE = "header_too_large"
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"          # a field is missing or of the wrong type
UNKNOWN_OP = "unknown_op"
VERSION = "version"                  # hello with an unsupported protocol version
NOT_READY = "not_ready"              # a request before hello
UNAUTHORIZED = "unauthorized"
UNKNOWN_SOURCE = "unknown_source"
NOT_FOUND = "not_found"              # run or file does not exist
UNKNOWN_DETECTOR = "unknown_detector"
UNKNOWN_MODE = "unknown_mode"
OUT_OF_RANGE = "out_of_range"
NO_CALIBRATION = "no_calibration"    # image assembly asked without constants
NO_GEOMETRY = "no_geometry"
READ_FAILED = "read_failed"          # the data source raised or returned nothing
NO_DATA = "no_data"                  # the event does not hold the detector (lower rate)
NOT_AN_ARRAY = "not_an_array"        # the detector has no frames (scalars: ask for fields)
NO_MEMORY = "no_memory"              # shared-memory budget or /dev/shm exhausted
BAD_SLOT = "bad_slot"
BAD_ARENA = "bad_arena"              # a batch arena that is not the group's, or a bad offset in it
BUSY = "busy"                        # too many requests queued on one connection
TIMEOUT = "timeout"
INTERNAL = "internal"

ALL_CODES = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))


class ProtocolError(Exception):
    """The peer broke the protocol; carries the code to reply with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerError(Exception):
    """An error reply the server sent on purpose, as the client raises it:
    `reply` is the reply itself (`replies.ErrorReply`, or a legacy one), or
    None when the client raised it without one."""

    def __init__(self, code: str, message: str, reply: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply

    @classmethod
    def from_reply(cls, reply: Any) -> "ServerError":
        """From an error reply: anything with `code` and `message`."""
        return cls(reply.code, reply.message, reply)
