"""Server addresses as users write them: `host:port`, `:port`, or a UNIX
socket path (anything with a `/`, or `unix:PATH`), parsed and printed;
several servers as a list of those, or as one text separated by commas.

Finding an address when none is given (environment, ready file) is the
client's job (`psana_ipc.client.discovery`): this module only reads text."""
from typing import Any, List, Tuple, Union

Address = Union[Tuple[str, int], str]
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def parse_address(text: Union[str, Tuple[str, int]]) -> Address:
    """A (host, port) tuple for TCP or a path string for a UNIX socket."""
    if isinstance(text, (tuple, list)):
        host, port = text
        return (str(host), _port(port, text))
    if "," in text:
        raise ValueError(f"address {text!r} names several servers where one is wanted")
    if text.startswith("unix:"):
        return text[len("unix:"):]
    if "/" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"address {text!r} is neither host:port nor a socket path")
    return (host.strip("[]") or DEFAULT_HOST, _port(port, text))


def parse_addresses(value: Any) -> List[Address]:
    """The addresses of one server or several: text with addresses separated
    by commas, a list of addresses, or one address ((host, port) is one)."""
    if isinstance(value, str):
        found = [parse_address(part.strip()) for part in value.split(",") if part.strip()]
    elif isinstance(value, (tuple, list)) and not _pair(value):
        found = [parse_address(one) for one in value]
    else:
        found = [parse_address(value)]
    if not found:
        raise ValueError(f"no server address in {value!r}")
    return found


def _pair(value: Union[tuple, list]) -> bool:
    """Whether a tuple or list is one (host, port) address."""
    return len(value) == 2 and isinstance(value[0], str) and (
        isinstance(value[1], int) or isinstance(value[1], str) and value[1].isdigit())


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


def is_loopback(host: str) -> bool:
    """A host name or address of this host only (IPv4, IPv6, or IPv4-mapped)."""
    return host.startswith(("127.", "::ffff:127.")) or host in ("::1", "localhost")


def address_family(address: Address) -> str:
    """The name of the `socket` module's family constant for `address`
    ("AF_UNIX", "AF_INET" or "AF_INET6"), for the code that makes the socket."""
    if isinstance(address, str):
        return "AF_UNIX"
    return "AF_INET6" if ":" in address[0] else "AF_INET"
