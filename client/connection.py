"""`Client`: one persistent v1 connection to an iserver.

It connects on first use and again after a fork (each DataLoader worker gets
its own connection), and turns error replies into `ServerError`. Frames
arrive in shared-memory slots (same host) or inline; `get`/`get_many` copy
each frame once and give its slot back (releases travel in batches, all
sent before the call returns); `view` and `frames` hand out the slot itself
(zero-copy) until released.

Zero-copy lifetime rule: the array of a `Frame` from `view` or `frames` is
valid until `Frame.release()` (or the end of its `with` block); after that
the server reuses the slot for another event. Copy what you keep.
"""
import os
import select
import socket
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from psana_ipc.protocol.address import Address, format_address
from psana_ipc.protocol.errors import ServerError
from psana_ipc.protocol.messages import encode_request, hello_request

from .discovery import find_token, resolve_address
from .shm import SlotMaps
from .wire import recv_message, send_message, socket_family

RELEASE_BATCH = 16
Reply = Tuple[Dict[str, Any], Optional[bytearray]]


class Frame:
    """One event's frame with its descriptor; holds a slot until released."""

    __slots__ = ("array", "desc", "_client", "_slot", "_generation")

    def __init__(self, array: np.ndarray, desc: Dict[str, Any], client: "Client",
                 slot: Optional[int]) -> None:
        self.array = array
        self.desc = desc
        self._client = client
        self._slot = slot
        self._generation = client.generation

    @property
    def event(self) -> int:
        return self.desc["event"]

    def release(self) -> None:
        """Give the slot back; a no-op once the connection it came from is gone
        (the server freed the slot with it)."""
        if self._slot is not None and self._generation == self._client.generation:
            self._client.release(self._slot)
        self._slot = None

    def __enter__(self) -> "Frame":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Client:
    """A connection to an iserver; see the module docstring for frame lifetimes."""

    def __init__(self, address: Any = None, *, transport: str = "auto",
                 token: Optional[str] = None, window: int = 0, writable: bool = False,
                 timeout: Optional[float] = 300.0, connect_timeout: float = 10.0) -> None:
        """`window`: frames this connection may hold (0: the server's default).
        `writable`: map slots writable, for code that insists on writable arrays
        and does not write them (torch.as_tensor)."""
        if transport not in ("auto", "shm", "inline"):
            raise ValueError("transport must be 'auto', 'shm' or 'inline'")
        self.address: Address = resolve_address(address)
        self.transport = transport
        self.token = token
        self.window = window
        self.writable = writable
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._pid = os.getpid()
        self._sock: Optional[socket.socket] = None
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        """Forget the connection; frames handed out before now no longer release."""
        self.generation += 1
        self._sock = None
        self._maps = SlotMaps(self.writable)
        self._next_id = 0
        self._pending: Dict[int, Deque[Reply]] = {}
        self._to_release: List[int] = []
        self._held: Set[int] = set()     # slots handed out and not released
        self.server: Dict[str, Any] = {}

    # -- connection ---------------------------------------------------------------------
    def _ensure(self) -> socket.socket:
        if self._pid != os.getpid():   # forked: the parent's connection is not ours to use
            if self._sock is not None:
                self._sock.close()
            self._pid = os.getpid()
            self._reset()
        if self._sock is None:
            self._connect()
        return self._sock

    def _connect(self) -> None:
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
        transport = "inline" if self.transport == "inline" else "shm"
        try:
            rid = self._send_header(hello_request(self._new_id(), socket.gethostname(), transport,
                                                  find_token(self.token, self.address),
                                                  self.window))
            self.server = self._result(rid)
        except BaseException:
            self.close()
            raise
        if self.transport == "shm" and self.server["transport"] != "shm":
            self.close()
            raise ConnectionError("the server cannot share memory with this client "
                                  "(another host?); use transport='auto' or 'inline'")

    def close(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            try:
                self.flush_releases()
            except OSError:
                pass
            self._sock.close()
        self._maps.close()
        self._reset()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle settings only (DataLoader workers may be spawned, not forked)."""
        return {k: getattr(self, k) for k in ("address", "transport", "token", "window",
                                              "writable", "timeout", "connect_timeout")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
        self.generation = 0
        self._reset()

    # -- messages -----------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send_header(self, header: Dict[str, Any]) -> int:
        send_message(self._sock, header)
        return header["id"]

    def _closed_while_idle(self) -> bool:
        """The server closes a connection that stays idle holding nothing past its
        --idle-timeout: an end of stream with no reply pending and no frame
        held, which the next request simply reconnects from."""
        if self._sock is None or self._pending or self._held:
            return False
        try:
            if not select.select([self._sock], [], [], 0)[0]:
                return False
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id."""
        self._ensure()
        if self._closed_while_idle():
            self.close()
            self._ensure()
        try:
            self.flush_releases()
            return self._send_header(encode_request(op, self._new_id(), **fields))
        except OSError:
            self.close()   # the stream is lost: the next request connects afresh
            raise

    def reply(self, rid: int) -> Reply:
        """The next reply to request `rid`, reading (and keeping) others on the way."""
        queue = self._pending.setdefault(rid, deque())
        while not queue:
            try:
                self.flush_releases()
                header, payload = recv_message(self._sock)
            except OSError:    # a timeout or a dropped connection: the stream is lost, and
                self.close()   # the next request connects afresh
                raise
            self._maps.drop(header.get("retired", ()))
            self._pending.setdefault(header.get("id", -1), deque()).append((header, payload))
            if header.get("id") == -1 and not header.get("ok", True):
                raise ServerError.from_reply(header)
        item = queue.popleft()
        if not queue and item[0].get("done", True):
            del self._pending[rid]
        return item

    def _result(self, rid: int) -> Dict[str, Any]:
        header, _ = self.reply(rid)
        if not header.get("ok"):
            raise ServerError.from_reply(header)
        return header

    def call(self, op: str, **fields: Any) -> Dict[str, Any]:
        return self._result(self.send(op, **fields))

    # -- releasing slots ------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """Give a slot back (sent in batches, and always before waiting for a reply)."""
        self._held.discard(slot)
        self._to_release.append(slot)
        if len(self._to_release) >= RELEASE_BATCH:
            self.flush_releases()

    def flush_releases(self) -> None:
        """Send the releases not sent yet (they go in batches)."""
        if self._to_release and self._sock is not None:
            slots = []
            while self._to_release:
                slots.append(self._to_release.pop())
            send_message(self._sock, encode_request("release", self._new_id(), slots=slots))

    def connect(self) -> "Client":
        """Connect now rather than on first use."""
        self._ensure()
        return self

    @property
    def worker(self) -> int:
        """The pid of the server worker this connection is served by."""
        return self.connect().server["worker"]

    # -- requests -----------------------------------------------------------------------
    def server_window(self) -> int:
        """Frames this connection may hold at once, as agreed with the server."""
        self._ensure()
        return self.server["window"]

    def ping(self) -> bool:
        return bool(self.call("ping").get("pong"))

    def info(self, exp: str, run: int, detector: Optional[str] = None) -> Dict[str, Any]:
        reply = self.call("info", exp=exp, run=int(run), detector=detector)
        return {k: v for k, v in reply.items() if k not in ("ok", "id")}

    def stats(self) -> Dict[str, Any]:
        return self.call("stats")["stats"]

    def shutdown(self) -> None:
        """Stop the whole server (needs the server's token if it has one)."""
        self.call("shutdown", token=find_token(self.token, self.address))
        self.close()

    def submit(self, exp: str, run: int, detector: str, events: Sequence[int],
               mode: str = "calib", access_mode: str = "idx") -> int:
        """Ask for several events without waiting; read them with `frames(rid)`."""
        return self.send("get", exp=exp, run=int(run), detector=detector, mode=mode,
                         events=[int(e) for e in events], access_mode=access_mode)

    def frames(self, rid: int) -> Iterator[Frame]:
        """The frames of a submitted get, in request order (zero-copy: see the
        lifetime rule). An error reply raises ServerError after the request's
        remaining replies are drained and their slots released."""
        error = None
        while True:
            header, payload = self.reply(rid)
            done = header.get("done", True)
            if not header.get("ok"):
                error = error or ServerError.from_reply(header)
            elif error is not None:
                if "slot" in header:
                    self.release(header["slot"])
            else:
                yield self._frame(header, payload)
            if done:
                break
        if error is not None:
            raise error

    def _frame(self, header: Dict[str, Any], payload: Optional[bytearray]) -> Frame:
        dtype = np.dtype(header["dtype"])
        if payload is not None:
            array = np.frombuffer(payload, dtype=dtype).reshape(header["shape"])
            return Frame(array, header, self, None)
        array = self._maps.view(header["slot"], header["name"], header["shape"], dtype)
        self._held.add(header["slot"])
        return Frame(array, header, self, header["slot"])

    def view(self, exp: str, run: int, detector: str, event: int, mode: str = "calib",
             access_mode: str = "idx") -> Frame:
        """One frame, zero-copy: use it in a `with` block or call `release()`."""
        return next(self.frames(self.submit(exp, run, detector, [event], mode, access_mode)))

    def get_frame(self, exp: str, run: int, detector: str, event: int, mode: str = "calib",
                  access_mode: str = "idx") -> Tuple[np.ndarray, Dict[str, Any]]:
        """One frame as a private array, with its descriptor (timestamp, calibrated)."""
        with self.view(exp, run, detector, event, mode, access_mode) as frame:
            copy = np.array(frame.array), frame.desc
        self.flush_releases()    # an idle client should not sit on a slot
        return copy

    def get(self, exp: str, run: int, detector: str, event: int, mode: str = "calib",
            access_mode: str = "idx") -> np.ndarray:
        """One frame as a private array."""
        return self.get_frame(exp, run, detector, event, mode, access_mode)[0]

    def get_many(self, exp: str, run: int, detector: str, events: Sequence[int],
                 mode: str = "calib", out: Optional[np.ndarray] = None,
                 access_mode: str = "idx") -> np.ndarray:
        """Frames of several events stacked into one array (or into `out`), each
        copied once straight from its slot; requests are pipelined."""
        rid = self.submit(exp, run, detector, events, mode, access_mode)
        for k, frame in enumerate(self.frames(rid)):
            with frame:
                if out is None:
                    out = np.empty((len(events),) + frame.array.shape, frame.array.dtype)
                np.copyto(out[k], frame.array)
        self.flush_releases()
        return out
