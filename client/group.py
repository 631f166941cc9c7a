"""`ConnectionGroup`: one connection per server worker, used as one.

Each connection is placed on a different worker (a hello reply names the
worker that serves it), so a request split across the group is produced by
all workers at once. Frames are read
round-robin, one per connection in turn, so no worker waits for the client
to drain another. BatchLoader and IPCRemotePsanaDataset both fetch this way.
The connections share one group id, so the server counts their memory as
one client's and keeps their batch buffers while any of them is open.
"""
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from psana_ipc.protocol.messages import Into
from psana_ipc.protocol.replies import WrittenFrame

from .connection import Client, Frame

DEFAULT_WINDOW = 32


class ConnectionGroup:
    def __init__(self, address: Any = None, size: int = 0, *, transport: str = "auto",
                 window: int = DEFAULT_WINDOW, writable: bool = False,
                 timeout: Optional[float] = 300.0) -> None:
        """`size` 0 means one connection per server worker (asked on first use)."""
        self._settings = dict(transport=transport, window=window, writable=writable,
                              timeout=timeout)
        self._first = Client(address, **self._settings)
        self._size = size
        self._clients: List[Client] = []
        self._pid = os.getpid()

    @property
    def address(self) -> Any:
        return self._first.address

    def connect(self) -> "ConnectionGroup":
        """Connect the first connection now, which fixes the group id."""
        self._first.connect()
        return self

    @property
    def group_id(self) -> Optional[str]:
        """The connection group id the server issued (None before connecting)."""
        return self._first.group

    @property
    def clients(self) -> List[Client]:
        """The connections, each on a different server worker where it can be had."""
        if self._pid != os.getpid():   # forked: connections are made again, placed again
            self._pid, self._clients = os.getpid(), []
        if not self._clients:
            self._clients = self._place(self._size or self._first.stats()["workers"])
        return self._clients

    def _place(self, size: int) -> List[Client]:
        """Open connections until `size` distinct workers serve them. The server
        balances by connection count, which idle connections of other clients
        skew, so a duplicate is kept open while searching (it steers the next
        accept elsewhere) and closed once the search ends."""
        placed = {self._first.worker: self._first}
        spare: List[Client] = []
        for _ in range(3 * size):
            if len(placed) >= size:
                break
            client = Client(self._first.address, group=self._first.group,
                            **self._settings).connect()
            if client.worker in placed:
                spare.append(client)
            else:
                placed[client.worker] = client
        chosen = list(placed.values()) + spare[: size - len(placed)]
        for client in spare[size - len(placed):]:
            client.close()
        return chosen

    @property
    def capacity(self) -> int:
        """Frames the group can hold at once: a batch larger than this cannot be
        held as views."""
        return sum(c.server_window() for c in self.clients)

    def submit(self, exp: str, run: int, detector: str, events: Sequence[int], mode: str,
               access_mode: str = "idx", fields: Optional[Sequence[str]] = None,
               skip_incomplete: bool = False,
               into: Optional[Callable[[int, int], Into]] = None
               ) -> List[Tuple[Client, int, int]]:
        """Split the events over the connections; (connection, request id, first
        position) for each connection that got any. `into(first position,
        count)`: where in a batch buffer that connection's frames go."""
        requests, start = [], 0
        for client, chunk in zip(self.clients, self._split(events)):
            if len(chunk):
                rid = client.submit(exp, run, detector, chunk.tolist(), mode, access_mode,
                                    fields, skip_incomplete,
                                    into=into(start, len(chunk)) if into else None)
                requests.append((client, rid, start))
            start += len(chunk)
        return requests

    def _split(self, events: Sequence[int]) -> List[np.ndarray]:
        """The share of each connection, in order."""
        return np.array_split(np.asarray(events, dtype=np.int64), len(self.clients))

    def prefetch(self, exp: str, run: int, detector: str, batches: Sequence[Sequence[int]],
                 mode: str, access_mode: str = "idx") -> None:
        """Tell each server worker the events it will be asked for in these
        batches (split as `submit` will split them), for it to read ahead."""
        shares = zip(*(self._split(events) for events in batches))
        for client, share in zip(self.clients, shares):
            client.prefetch(exp, run, detector, np.concatenate(share).tolist(), mode,
                            access_mode)

    @staticmethod
    def wait(requests: List[Tuple[Client, int, int]]) -> List[Tuple[int, WrittenFrame]]:
        """Wait until every frame of a split written into a batch buffer is
        there; (position, frame) for each (an error reply raises ServerError)."""
        return [(start + frame.seq, frame) for client, rid, start in requests
                for reply, _ in client.replies(rid) for frame in reply.frames]

    def stream(self, requests: List[Tuple[Client, int, int]]) -> Iterator[Tuple[int, Frame]]:
        """(position, frame) for every event of a submitted split, round-robin;
        an event the server skipped leaves its position out. Before waiting on
        one connection, the frames let go on the others are released: the
        group shares one fair share of the server's budget."""
        cursors = [(client.frames(rid), start) for client, rid, start in requests]
        while cursors:
            for cursor in list(cursors):
                self.flush_releases()
                frame = next(cursor[0], None)
                if frame is None:
                    cursors.remove(cursor)
                    continue
                yield cursor[1] + frame.reply.seq, frame

    def flush_releases(self) -> None:
        for client in self._clients:
            client.flush_releases()

    def close(self) -> None:
        for client in {id(c): c for c in [self._first] + self._clients}.values():
            client.close()
        self._clients = []
