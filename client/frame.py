"""`Frame`: one event's frame and the reply that described it, holding its
memory in the server's pool until released (the zero-copy lifetime rule of
connection.py)."""
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np

from psana_ipc.protocol.replies import FrameReply

from .field_values import decode_values
from .pool import Hold

if TYPE_CHECKING:
    from .connection import Connection


class Frame:
    """One event's frame with the reply that described it; holds its memory
    in the server's pool until released."""

    __slots__ = ("array", "reply", "landed", "_client", "_handle", "_hold", "_generation")

    def __init__(self, array: np.ndarray, reply: FrameReply, client: "Connection",
                 handle: Optional[int] = None, hold: Optional[Hold] = None,
                 landed: bool = False) -> None:
        self.array = array
        self.reply = reply
        self.landed = landed      # inline, received into the memory the request's `land` gave
        self._client = client
        self._handle = handle
        self._hold = hold
        self._generation = client.generation

    @property
    def private(self) -> bool:
        """Whether the array is this process's own memory (the frame came
        inline), not the server's pool."""
        return self._hold is None

    @property
    def desc(self) -> Dict[str, Any]:
        """The reply's header: timestamp, calibrated, values, name, ..."""
        return self.reply.to_header()

    @property
    def event(self) -> int:
        """The event index this frame is of."""
        return self.reply.event

    @property
    def values(self) -> Dict[str, np.ndarray]:
        """The values of the fields the get named (see `Client.get`)."""
        return decode_values(self.reply.desc.values)

    def release(self) -> None:
        """Let go of the frame's memory (the hold first, then the server is told
        with the next message; a connection gone since needs no telling)."""
        if self._hold is not None:
            self._hold.close()
            self._hold = None
        if self._handle is not None and self._generation == self._client.generation:
            self._client.release(self._handle)
        self._handle = None

    def __enter__(self) -> "Frame":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
