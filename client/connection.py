"""`Connection`: one persistent v1 connection to an iserver, the core under
`Client`'s requests (client/client.py).

It connects on first use and again after a fork (each DataLoader worker gets
its own connection), and turns error replies into `ServerError`. It sends
the protocol's request types (`protocol.messages`) and reads every reply as
the protocol's reply types (`protocol.replies`), never a header by hand. It
keeps track of the frames it handed out, whose releases travel in batches,
and receives a frame that comes inline straight into where it is kept (the
memory the request's `land` names, else an array of its own), so its bytes
are copied once, by the kernel, and never again here.
"""
import contextlib
import os
import select
import socket
import warnings
from collections import deque
from typing import (Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence,
                    Set, Tuple)

import numpy as np

from psana_ipc.protocol import PROTOCOL_VERSION
from psana_ipc.protocol.address import Address, format_address
from psana_ipc.protocol.errors import BAD_ARENA, ProtocolError, ServerError
from psana_ipc.protocol.messages import FreeArenas, Hello, Release, Request, frame_nbytes
from psana_ipc.protocol.replies import (NO_REPLY, ErrorReply, FrameReply, Reply, Welcome,
                                        parse_reply)

from . import pool
from .discovery import find_token, resolve_address
from .pool import Pools
from .wire import ConnectionClosed, Receiver, send_message, socket_family

RELEASE_BATCH = 16
# Where an inline frame goes, asked once its reply is read and before its bytes are: an
# array of exactly the frame's size (a batch's row), or None for an array of its own.
Land = Callable[[FrameReply], Optional[np.ndarray]]


class Payload(NamedTuple):
    """The bytes of a frame that came inline, as received."""
    array: np.ndarray
    landed: bool          # in the memory the request's `land` gave


WithPayload = Tuple[Reply, Optional[Payload]]  # a reply, and the frame that came inline


def _fresh(reply: Reply, size: int) -> np.ndarray:
    """New memory for a payload: an array of the frame's shape and dtype (as
    `get` hands it out), or bytes when the reply describes another size."""
    if isinstance(reply, FrameReply):
        dtype = np.dtype(reply.desc.dtype)
        if frame_nbytes(reply.desc.shape, dtype.itemsize) == size:
            return np.empty(reply.desc.shape, dtype)
    return np.empty(size, np.uint8)


class Connection:
    """One connection to an iserver: connecting (again in a forked child, or
    after a restart), requests and their replies, and the releases of what
    its frames hold. The request API over it, and its arguments: `Client`."""

    def __init__(self, address: Any = None, *, transport: str = "auto",
                 token: Optional[str] = None, window: int = 0, writable: bool = False,
                 timeout: Optional[float] = 300.0, connect_timeout: float = 10.0,
                 group: Optional[str] = None, leader: Optional["Connection"] = None) -> None:
        if transport not in ("auto", "shm", "inline"):
            raise ValueError("transport must be 'auto', 'shm' or 'inline'")
        self.address: Address = resolve_address(address)
        self.transport = transport
        self.token = token
        self.window = window
        self.writable = writable
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.group = group
        self._issued: Optional[str] = None     # the group id a server gave this client
        self._leader = leader
        self._pid = os.getpid()
        self._sock: Optional[socket.socket] = None
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        """Forget the connection; frames handed out before now no longer release."""
        self.generation += 1
        self._sock = None
        self._receiver: Optional[Receiver] = None
        self.pools: Optional[Pools] = None      # the server's memory, shared by the process
        self._hints: Set[int] = set()    # prefetch requests whose replies nobody waits for
        self._next_id = 0
        self._waiting: Dict[int, Request] = {}     # requests whose last reply has not come
        self._land: Dict[int, Land] = {}     # where the inline frames of a get go, by its id
        self._pending: Dict[int, Deque[WithPayload]] = {}
        self._to_release: List[int] = []
        self._to_free: List[int] = []      # batch buffers to give back with the next message
        self._held: Set[int] = set()     # frames handed out and not released
        self.server: Optional[Welcome] = None     # the hello reply, once connected

    # -- connection ---------------------------------------------------------------------
    def _ensure(self) -> socket.socket:
        if not self.connected():
            self._connect()
        return self._sock

    def connected(self) -> bool:
        """Whether this process has the connection open (false in a forked child
        until it connects again)."""
        if self._pid != os.getpid():   # forked: the parent's connection is not ours to use
            if self._sock is not None:
                self._sock.close()
            self._pid = os.getpid()
            self._reset()
        return self._sock is not None

    def _connect(self) -> None:
        self._welcomed(self._open())

    def _open(self) -> int:
        """Connect the socket and send the hello; its request id."""
        sock = socket.socket(socket_family(self.address), socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.address)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot connect to iserver at "
                                  f"{format_address(self.address)}: {e}") from e
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        self._sock = sock
        self._receiver = Receiver(sock)
        transport = "inline" if self.transport == "inline" else "shm"
        try:
            return self._send_request(Hello(PROTOCOL_VERSION, find_token(self.token, self.address),
                                            socket.gethostname(), transport, self.window,
                                            self.group))
        except BaseException:
            self.close()
            raise

    def _welcomed(self, rid: int) -> None:
        """Read the hello's reply: joined the group, and the server's memory mapped."""
        try:
            self.server = self._result(rid)
            self.group = self._issued = self.server.group
        except ServerError as e:
            self.close()
            if e.code != BAD_ARENA or self.group is None:
                raise
            if self._leader is not None:
                self._follow_leader()
                return
            if self.group != self._issued:
                raise           # only a group a server issued before may be forgotten
            warnings.warn(f"the server no longer knows connection group {self.group} (it "
                          f"restarted?): this connection starts a new group")
            self.group = None
            self._connect()
            return
        except BaseException:
            self.close()
            raise
        if self.transport == "shm" and self.server.transport != "shm":
            self.close()
            raise ConnectionError("the server cannot share memory with this client "
                                  "(another host?); use transport='auto' or 'inline'")
        if self.server.transport == "shm":
            try:
                self.pools = pool.acquire(self.server.door, self.writable)
            except BaseException:
                self.close()
                raise

    def _follow_leader(self) -> None:
        """The server no longer knows the group: join the one it issues the
        leader (asked again first, so it reconnects into it), not a group of
        this connection's own."""
        stale = self.group
        self._leader.ping()
        if self._leader.group in (None, stale):
            raise ServerError(BAD_ARENA, f"the server no longer knows connection group "
                                         f"{stale}, and the group's first connection is "
                                         f"still in it")
        self.group = self._leader.group
        self._connect()

    def close(self) -> None:
        """Release what this connection holds and close it (the next request
        connects again)."""
        if self._sock is not None and self._pid == os.getpid():
            try:
                self._send_releases()
            except OSError:
                pass
            self._sock.close()
        if self.pools is not None and self._pid == os.getpid():
            pool.release(self.pools.door, self.writable)
        self._reset()

    def __del__(self) -> None:
        """Close the socket of a client dropped without `close()`, saying nothing
        to the server (no I/O from a finalizer): the server frees what the
        connection held when it sees it closed."""
        sock = self.__dict__.get("_sock")
        if sock is not None:
            sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle settings only (DataLoader workers may be spawned, not forked)."""
        return {k: getattr(self, k) for k in ("address", "transport", "token", "window",
                                              "writable", "timeout", "connect_timeout")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.group = self._issued = self._leader = None
        self._pid = os.getpid()
        self.generation = 0
        self._reset()

    # -- messages -----------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send_request(self, request: Request) -> int:
        rid = self._new_id()
        send_message(self._sock, request.to_header(rid))
        if not isinstance(request, NO_REPLY):
            self._waiting[rid] = request
        return rid

    def _refused(self, error: ProtocolError) -> int:
        """A request the server would refuse, answered here as it would answer
        it (nothing is sent): its id, whose reply raises ServerError."""
        rid = self._new_id()
        self._pending[rid] = deque([(ErrorReply(rid, error.code, error.message), None)])
        return rid

    def _closed_while_idle(self) -> bool:
        """The server closes a connection that stays idle holding nothing past its
        --idle-timeout: an end of stream with no reply pending and no frame
        held, which the next request simply reconnects from."""
        if self._sock is None or self._pending or self._held or self._receiver.buffered():
            return False
        try:
            poller = select.poll()      # not select(): descriptors past 1024 are common
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(0):
                return False
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _lost(self) -> str:
        return (f"lost the connection to iserver at {format_address(self.address)}: "
                f"the server stopped or restarted")

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        """A timeout or a dropped connection loses the stream: close it, so the next
        request connects afresh; a drop says in one line what happened."""
        try:
            yield
        except (ConnectionResetError, BrokenPipeError, ConnectionClosed) as e:
            self.close()
            raise ConnectionClosed(self._lost()) from e
        except OSError:
            self.close()
            raise

    def forget_if_closed(self) -> None:
        """Forget a connection the server closed while it was idle (its idle
        timeout, a restart between epochs): what was tied to it (batch buffers)
        is then known gone, and the next request connects again. One closed
        under requests still waiting for replies is left for them to report."""
        if self._sock is not None and self._pid == os.getpid() and not self._waiting \
                and self._closed_while_idle():
            self.close()

    def send(self, request: Request) -> int:
        """Send a request without waiting; returns its id."""
        self._ensure()
        if self._closed_while_idle():
            self.close()
            try:
                self._ensure()
            except ConnectionError as e:
                raise ConnectionClosed(f"{self._lost()} ({e})") from e
        with self._stream():
            self._send_releases()
            return self._send_request(request)

    def reply(self, rid: int) -> WithPayload:
        """The next reply to request `rid`, reading (and keeping) others on the way."""
        queue = self._pending.setdefault(rid, deque())
        while not queue:
            if self._sock is None:       # closed since the request was sent
                self._pending.pop(rid, None)
                raise ConnectionClosed(self._lost())
            with self._stream():
                self._send_releases()
                head = self._receiver.head()
                try:
                    reply = parse_reply(head.header, self._waiting)
                except ProtocolError:
                    self.close()       # its payload, if any, is still in the stream
                    raise
                payload = self._receive(head.size, reply) if head.size else None
            if reply.last:
                self._waiting.pop(reply.rid, None)
                self._land.pop(reply.rid, None)
            if reply.rid in self._hints:
                self._hints.discard(reply.rid)
                continue
            self._pending.setdefault(reply.rid, deque()).append((reply, payload))
            if reply.rid == -1 and isinstance(reply, ErrorReply):
                raise ServerError.from_reply(reply)
        item = queue.popleft()
        if not queue and item[0].last:
            del self._pending[rid]
        return item

    def _receive(self, size: int, reply: Reply) -> Payload:
        """A payload, received where the request's `land` says (a row of its
        batch), else into new memory."""
        landing = self._landing(reply, size)
        array = landing if landing is not None else _fresh(reply, size)
        self._receiver.payload(memoryview(array.reshape(-1)).cast("B"))
        return Payload(array, landing is not None)

    def _landing(self, reply: Reply, size: int) -> Optional[np.ndarray]:
        """The memory the request's `land` gives a frame, if it fits exactly."""
        land = self._land.get(reply.rid) if isinstance(reply, FrameReply) else None
        array = land(reply) if land is not None else None
        if array is None or array.nbytes != size or not array.flags.c_contiguous \
                or not array.flags.writeable:
            return None
        return array

    def _result(self, rid: int) -> Any:
        reply, _ = self.reply(rid)
        if isinstance(reply, ErrorReply):
            raise ServerError.from_reply(reply)
        return reply

    def call(self, request: Request) -> Reply:
        """Send a request and return its reply; an error reply raises ServerError."""
        return self._result(self.send(request))

    # -- releasing frames -----------------------------------------------------------------
    def release(self, handle: int) -> None:
        """Tell the server a frame was let go (sent in batches, and always before
        waiting for a reply)."""
        self._held.discard(handle)
        self._to_release.append(handle)
        if len(self._to_release) >= RELEASE_BATCH:
            self.flush_releases()

    def flush_releases(self) -> None:
        """Send the releases not sent yet (they go in batches); a connection
        lost meanwhile raises ConnectionClosed."""
        if self._to_release or self._to_free:
            with self._stream():
                self._send_releases()

    def _send_releases(self) -> None:
        if self._to_release and self._sock is not None:
            handles = []
            while self._to_release:
                handles.append(self._to_release.pop())
            self._send_request(Release(tuple(handles)))
        if self._to_free and self._sock is not None:
            tickets = []
            while self._to_free:
                tickets.append(self._to_free.pop())
            self._send_request(FreeArenas(tuple(tickets)))

    def answered(self, rid: int) -> bool:
        """Whether the next reply to `rid` is had without waiting for the
        server: one was read already (whole, or begun), none is to come, or the
        connection is gone (reading then raises)."""
        return bool(self._pending.get(rid)) or rid not in self._waiting or self._sock is None \
            or self._receiver.buffered()

    def fileno(self) -> int:
        """The connection's socket (-1 when not connected)."""
        return self._sock.fileno() if self._sock is not None else -1

    def connect(self) -> "Connection":
        """Connect now rather than on first use."""
        self._ensure()
        return self

    @staticmethod
    def connect_all(connections: Sequence["Connection"]) -> None:
        """Connect those not connected yet, their hellos in flight together (one
        round trip for all, which a new DataLoader worker's first batch waits for)."""
        opened = []
        try:
            for connection in connections:
                if not connection.connected():
                    opened.append((connection, connection._open()))
            while opened:
                connection, rid = opened.pop(0)
                connection._welcomed(rid)
        except BaseException:
            for connection, _ in opened:
                connection.close()
            raise

    @property
    def worker(self) -> int:
        """The pid of the server worker this connection is served by."""
        return self.connect().server.worker
