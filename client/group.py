"""`ConnectionGroup`: one connection per server worker, of one server or of
several, used as one.

Each connection is placed on a different worker (a hello reply names the
worker that serves it), so a request split across the group is produced by
all workers at once. Frames are read from whichever connections have them
coming, one per connection in turn, so no worker waits for the client to
drain another, nor for the client to wait on a slower one (a frame sent
inline fills the socket's buffers: unread, it would stall its worker). BatchLoader and
IPCRemotePsanaDataset both fetch this way. The connections to one server
share one group id, so that server counts their memory as one client's and
keeps their batch buffers while any of them is open.

Several servers (one per CPU node of a job, all serving the same runs) are
one group too: a split goes over the connections of every server, so the
events are spread over all their workers. A server lost on the way (its
connections closed or reset, new ones refused, or no reply within the
connections' timeout, as when its node goes without closing them) is left
out from then on (until `close`), and the frames it still owed are asked
of the others, so every frame arrives once; only the loss of the last
server raises (ConnectionError, or TimeoutError).
"""
import logging
import os
import select
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from psana_ipc.protocol.address import format_address
from psana_ipc.protocol.messages import Into
from psana_ipc.protocol.replies import FrameReply, WrittenFrame

from .client import Client, fitting
from .frame import Frame
from .discovery import resolve_addresses

log = logging.getLogger(__name__)
DEFAULT_WINDOW = 32
LOST = (ConnectionError, TimeoutError)     # what says a server is gone
T = TypeVar("T")
# Where the inline frame at a batch position goes (see connection.Land).
Land = Callable[[int, FrameReply], Optional[np.ndarray]]


class Server:
    """The connections to one server, each on a different worker where it can be had."""

    def __init__(self, address: Any, size: int, settings: Dict[str, Any]) -> None:
        self.first = Client(address, **settings)
        self.size = size
        self.settings = settings
        self.clients: List[Client] = []
        self.lost = False
        self.workers = 0     # the server's, once known (a forked DataLoader worker inherits it)

    @property
    def name(self) -> str:
        return format_address(self.first.address)

    def connections(self) -> List[Client]:
        if not self.clients:
            self.clients = self._place(self.size or self._workers())
        return self.clients

    def connect(self) -> None:
        """Connect the first connection, which fixes the group id, and learn
        how many workers the server has: told in its hello reply (asked of a
        server that does not tell)."""
        self.first.connect()
        self.workers = self.first.server.workers or self.first.stats()["workers"]

    def _workers(self) -> int:
        if not self.workers:
            self.connect()
        return self.workers

    def _place(self, size: int) -> List[Client]:
        """Open connections until `size` distinct workers serve them: the first
        `size` together (once the group's id is known: inherited by a forked
        DataLoader worker, else issued to the first), then one at a time. The
        server balances by connection count, which idle connections of other
        clients skew, so a duplicate is kept open while searching (it steers
        the next accept elsewhere) and closed once the search ends."""
        def another() -> Client:
            return Client(self.first.address, group=self.first.group, leader=self.first,
                          **self.settings)
        if self.first.group is None:
            self.first.connect()
        opened = [another() for _ in range(size - 1)]
        Client.connect_all([self.first] + opened)
        placed = {self.first.worker: self.first}
        spare: List[Client] = []
        for _ in range(3 * size):
            if len(placed) >= size:
                break
            client = opened.pop() if opened else another().connect()
            if client.worker in placed:
                spare.append(client)
            else:
                placed[client.worker] = client
        chosen = list(placed.values()) + spare[: size - len(placed)]
        for client in spare[size - len(placed):]:
            client.close()
        return chosen

    def close(self) -> None:
        for client in {id(c): c for c in [self.first] + self.clients}.values():
            client.close()
        self.clients = []


@dataclass(frozen=True)
class Ask:
    """A get as the group asks it of its connections (again, of other
    servers, for the events a lost one owed)."""
    exp: str
    run: int
    detector: str
    mode: str
    access_mode: str = "idx"
    fields: Optional[Sequence[str]] = None
    skip_incomplete: bool = False
    into: Optional[Callable[[int, int], Into]] = None
    land: Optional[Land] = None


@dataclass
class Share:
    """One connection's part of a split: its events, from batch position `start`."""
    server: Server
    client: Client
    rid: int
    start: int
    events: List[int]
    ask: Ask


class ConnectionGroup:
    def __init__(self, address: Any = None, size: int = 0, *, transport: str = "auto",
                 window: int = DEFAULT_WINDOW, writable: bool = False,
                 timeout: Optional[float] = 300.0) -> None:
        """`address`: one server or several (a list, or addresses separated by
        commas); `size` 0 means one connection per server worker (asked on
        first use)."""
        settings = dict(transport=transport, window=window, writable=writable, timeout=timeout)
        self.servers = [Server(a, size, settings) for a in resolve_addresses(address)]
        self._pid = os.getpid()

    @property
    def address(self) -> Any:
        """The first server's address."""
        return self.servers[0].first.address

    def connect(self) -> "ConnectionGroup":
        """Connect to every server now, which fixes their group ids."""
        for server in self.servers:
            server.connect()
        return self

    @property
    def group_id(self) -> Optional[str]:
        """The connection group id the first server issued (None before connecting)."""
        return self.servers[0].first.group

    def _live(self) -> List[Server]:
        if self._pid != os.getpid():   # forked: connections are made again, placed again
            self._pid = os.getpid()
            for server in self.servers:
                server.clients = []
        return [s for s in self.servers if not s.lost]

    def _connections(self) -> List[Tuple[Server, Client]]:
        """(server, connection) for every connection of every server not lost."""
        while True:
            found = []
            try:
                for server in self._live():
                    found += [(server, client) for client in server.connections()]
                return found
            except LOST as e:
                self._lose(server, e)

    @property
    def clients(self) -> List[Client]:
        """The connections of every server not lost."""
        return [client for _, client in self._connections()]

    def _lose(self, server: Server, error: OSError) -> None:
        """Leave a server out after `error`, if another is left; else raise it."""
        if server.lost:
            return
        others = [s for s in self._live() if s is not server]
        if not others:
            lost = [s.name for s in self.servers if s.lost]
            if lost:
                raise ConnectionError(f"{error}; the other servers ({', '.join(lost)}) were "
                                      f"lost before") from error
            raise error
        server.lost = True
        server.close()
        log.warning("left out the server at %s (%s); its events go to %s", server.name, error,
                    ", ".join(s.name for s in others))

    def ask(self, question: Callable[[Client], T]) -> T:
        """`question(connection)` answered by the first server that can (info,
        stats); a server lost meanwhile is left out."""
        while True:
            server = self._live()[0]
            try:
                return question(server.first)
            except LOST as e:
                self._lose(server, e)

    @property
    def capacity(self) -> int:
        """Frames the group can hold at once: a batch larger than this cannot be
        held as views."""
        return sum(c.server_window() for c in self.clients)

    def submit(self, exp: str, run: int, detector: str, events: Sequence[int], mode: str,
               access_mode: str = "idx", fields: Optional[Sequence[str]] = None,
               skip_incomplete: bool = False,
               into: Optional[Callable[[int, int], Into]] = None,
               land: Optional[Land] = None) -> List[Share]:
        """Split the events over the connections; a `Share` for each connection
        that got any. `into(first position, count)`: where in a batch buffer
        that connection's frames go; `land(position, reply)`: where an inline
        frame is received."""
        ask = Ask(exp, int(run), detector, mode, access_mode, fields, skip_incomplete, into,
                  land)
        return self._spread(ask, [int(e) for e in events], 0)

    def _spread(self, ask: Ask, events: List[int], first: int) -> List[Share]:
        """Shares of `events` (batch positions from `first`) over the live
        connections; a chunk that a lost server cannot take goes to the others."""
        connections = self._connections()
        shares, start = [], first
        for (server, client), chunk in zip(connections, _split(events, len(connections))):
            chunk = chunk.tolist()
            if chunk:
                shares += self._share(ask, server, client, chunk, start)
            start += len(chunk)
        return shares

    def _share(self, ask: Ask, server: Server, client: Client, events: List[int],
               start: int) -> List[Share]:
        if not server.lost:
            land = ask.land
            try:
                rid = client.submit(ask.exp, ask.run, ask.detector, events, ask.mode,
                                    ask.access_mode, ask.fields, ask.skip_incomplete,
                                    into=ask.into(start, len(events)) if ask.into else None,
                                    land=(lambda reply: land(start + reply.seq, reply))
                                    if land else None)
                return [Share(server, client, rid, start, events, ask)]
            except LOST as e:
                self._lose(server, e)
        return self._spread(ask, events, start)

    def prefetch(self, exp: str, run: int, detector: str, batches: Sequence[Sequence[int]],
                 mode: str, access_mode: str = "idx") -> None:
        """Tell each server worker the events it will be asked for in these
        batches (split as `submit` will split them), for it to read ahead."""
        connections = self._connections()
        shares = zip(*(_split(events, len(connections)) for events in batches))
        for (server, client), share in zip(connections, shares):
            try:
                client.prefetch(exp, run, detector, np.concatenate(share).tolist(), mode,
                                access_mode)
            except LOST as e:
                self._lose(server, e)

    @staticmethod
    def wait(shares: List[Share]) -> List[Tuple[int, WrittenFrame]]:
        """Wait until every frame of a split written into a batch buffer is
        there; (position, frame) for each (an error reply raises ServerError)."""
        return [(share.start + frame.seq, frame) for share in shares
                for reply, _ in share.client.replies(share.rid) for frame in reply.frames]

    def stream(self, shares: List[Share]) -> Iterator[Tuple[int, Frame]]:
        """(position, frame) for every event of a submitted split, round-robin;
        an event the server skipped leaves its position out. Before waiting
        for any connection, the frames let go on all are released: the group
        shares one fair share of each server's budget (the frames of one pass
        over the connections are there already). The events a lost server
        still owed are asked of the others and come after."""
        cursors = [_Cursor(share) for share in shares]
        while cursors:
            self.flush_releases()
            for cursor in _arriving(cursors):
                try:
                    frame = next(cursor.frames, None)
                except LOST as e:
                    cursors.remove(cursor)
                    self._lose(cursor.share.server, e)
                    cursors += [_Cursor(s) for s in self._spread(cursor.share.ask,
                                                                 *cursor.owed())]
                    continue
                if frame is None:
                    cursors.remove(cursor)
                    continue
                cursor.seen = frame.reply.seq
                yield cursor.share.start + frame.reply.seq, frame

    def flush_releases(self) -> None:
        for server in self._live():
            try:
                for client in server.clients:
                    client.flush_releases()
            except LOST as e:
                self._lose(server, e)

    def close(self) -> None:
        """Close every connection; servers left out are tried again on next use."""
        for server in self.servers:
            server.close()
            server.lost = False


class _Cursor:
    """A share's frames as they are read, and how far they got."""

    def __init__(self, share: Share) -> None:
        self.share = share
        self.frames = share.client.frames(share.rid)
        self.seen = -1          # the seq of the last frame read

    def owed(self) -> Tuple[List[int], int]:
        """The events not read yet, and the batch position of the first."""
        return self.share.events[self.seen + 1:], self.share.start + self.seen + 1


def rows_of(batch: np.ndarray) -> Land:
    """Where the inline frame at a batch position goes: its row of `batch`,
    if the frame is of the batch's shape and dtype."""
    return lambda position, reply: fitting(batch[position], reply)


def _arriving(cursors: List["_Cursor"]) -> List["_Cursor"]:
    """The cursors whose next frame is arriving, waiting for one if none is
    (all of them after the connections' timeout, whose read then says so).
    Where every frame is in shared memory, none: all of them, read in turn,
    as a reply's few bytes wait in its socket at no cost to the server, and
    a client that wakes for each connection's reply takes the core from a
    server worker writing the next frame (a fifth more switches a frame)."""
    ready = [c for c in cursors if c.share.client.answered(c.share.rid)]
    if ready or len(cursors) == 1 or not any(c.share.client.server.transport == "inline"
                                             for c in cursors):
        return ready or cursors
    poller = select.poll()
    by_fd = {}
    for cursor in cursors:
        by_fd.setdefault(cursor.share.client.fileno(), []).append(cursor)
        poller.register(cursor.share.client.fileno(), select.POLLIN)
    timeout = cursors[0].share.client.timeout
    found = poller.poll(None if timeout is None else 1e3 * timeout)
    return [c for fd, _ in found for c in by_fd[fd]] or cursors


def _split(events: Sequence[int], parts: int) -> List[np.ndarray]:
    """The share of each of `parts` connections, in order."""
    return np.array_split(np.asarray(events, dtype=np.int64), parts)
