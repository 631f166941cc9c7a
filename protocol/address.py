"""Server addresses as users write them: `host:port`, `:port`, or a UNIX
socket path (anything with a `/`, or `unix:PATH`); and where a client finds
one when none is given: $PSANA_IPC_ADDRESS, or the ready file a server wrote
(`iserver --ready-file`) named by $PSANA_IPC_READY_FILE."""
import json
import os
import socket
from typing import Any, Dict, Tuple, Union

Address = Union[Tuple[str, int], str]
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
ENV_ADDRESS = "PSANA_IPC_ADDRESS"
ENV_READY_FILE = "PSANA_IPC_READY_FILE"


def parse_address(text: Union[str, Tuple[str, int]]) -> Address:
    """A (host, port) tuple for TCP or a path string for a UNIX socket."""
    if isinstance(text, (tuple, list)):
        host, port = text
        return (str(host), _port(port, text))
    if text.startswith("unix:"):
        return text[len("unix:"):]
    if "/" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"address {text!r} is neither host:port nor a socket path")
    return (host.strip("[]") or DEFAULT_HOST, _port(port, text))


def _port(port: Union[str, int], address: object) -> int:
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError(f"address {address!r}: the port must be a number from 0 to 65535")
    return number


def format_address(address: Address) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_family(address: Address) -> int:
    if isinstance(address, str):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def ready_info() -> Dict[str, Any]:
    """The JSON of the ready file $PSANA_IPC_READY_FILE names ({} if unset):
    the server's `address`, `pid` and `token_file`."""
    path = os.environ.get(ENV_READY_FILE)
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def resolve_address(address=None) -> Address:
    """An explicit address, else $PSANA_IPC_ADDRESS, else the address in the
    ready file $PSANA_IPC_READY_FILE, else 127.0.0.1:5000."""
    if address is None:
        address = (os.environ.get(ENV_ADDRESS) or ready_info().get("address")
                   or f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    return parse_address(address)
