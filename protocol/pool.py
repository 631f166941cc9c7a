"""The server's pool of frame memory, as both ends address it.

Every frame a local client reads, every cache entry and every batch buffer
is an extent of a pool: `size` bytes at `offset` of one file the server
made (a sealed memfd, or for a frame cache on disk a file without a name),
which a local client receives once as a read-only descriptor through the
server's door, a UNIX socket named in the hello reply. An extent's offset
and size are multiples of the page size, and its last TICKET_BYTES hold
its ticket: a random number drawn anew for every use of the extent. A
client takes its hold on an extent (a read lock), then checks the ticket
the reply named: a different one means the extent went to another use
before the hold was taken, and the bytes there are not the frame asked
for.

The door answers a connection with one message: the JSON `door_message`
names the pools, whose descriptors travel beside it, in the same order.
"""
import json
import struct
from typing import List, Optional, Tuple

TICKET_BYTES = 8
MAX_DOOR_MESSAGE = 4096
Pools = List[Tuple[int, int]]      # (pool id, size in bytes) per descriptor sent


def ticket_offset(offset: int, size: int) -> int:
    """Where the ticket of the extent of `size` bytes at `offset` lies."""
    return offset + size - TICKET_BYTES


def encode_ticket(ticket: int) -> bytes:
    return ticket.to_bytes(TICKET_BYTES, "little")


def decode_ticket(data: bytes) -> int:
    return int.from_bytes(data, "little")


def door_message(pools: Pools) -> bytes:
    return json.dumps({"pools": [[p, n] for p, n in pools]}).encode()


def parse_door_message(data: bytes) -> Pools:
    """The pools a door message names; ValueError if it is not one."""
    try:
        pools = json.loads(data.decode())["pools"]
        return [(int(p), int(n)) for p, n in pools]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a door message: {data[:80]!r}") from e


# Holds are open-file-description record locks (Linux's F_OFD_*): they belong to
# a descriptor, not to a process, so a hold passes to another process with its
# descriptor and goes when its last descriptor closes, however the holder ends.
F_OFD_GETLK, F_OFD_SETLK = 36, 37
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
_FLOCK = struct.Struct("hhqqi4x")     # Linux's struct flock with a 64-bit off_t


def lock_request(kind: int, offset: int, size: int) -> bytes:
    """The `struct flock` asking for (or testing) a lock of `kind` on a range."""
    return _FLOCK.pack(kind, 0, offset, size, 0)


def lock_found(answer: bytes) -> Optional[Tuple[int, int]]:
    """(start, length) of the lock an F_OFD_GETLK found, or None; a length of 0
    reaches the end of the file."""
    kind, _, start, length, _ = _FLOCK.unpack(answer)
    return None if kind == F_UNLCK else (start, length)
