"""Where a client finds its server and token when not told: the environment
and the ready file a server wrote (`iserver --ready-file`).

The address: an explicit one, else $PSANA_IPC_ADDRESS, else the ready file
$PSANA_IPC_READY_FILE names. Loaders and datasets may take several servers:
a list, or addresses separated by commas (also in $PSANA_IPC_ADDRESS, as a
job whose servers run on other nodes sets it). The token: an explicit one, else
$PSANA_IPC_TOKEN, else the file $PSANA_IPC_TOKEN_FILE names, else the token
file of that ready file's server, and only for that server's address.
"""
import json
import os
from typing import Any, Dict, List, Optional

from psana_ipc.protocol.address import (DEFAULT_HOST, DEFAULT_PORT, Address, parse_address,
                                        parse_addresses)

ENV_ADDRESS = "PSANA_IPC_ADDRESS"
ENV_READY_FILE = "PSANA_IPC_READY_FILE"
ENV_TOKEN = "PSANA_IPC_TOKEN"
ENV_TOKEN_FILE = "PSANA_IPC_TOKEN_FILE"


def ready_info() -> Dict[str, Any]:
    """The JSON of the ready file $PSANA_IPC_READY_FILE names ({} if unset):
    the server's `address`, `pid` and `token_file`."""
    path = os.environ.get(ENV_READY_FILE)
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def _given(address: Any) -> Any:
    """An explicit address, else $PSANA_IPC_ADDRESS, else the address in the
    ready file $PSANA_IPC_READY_FILE, else 127.0.0.1:5000."""
    if address is None:
        address = (os.environ.get(ENV_ADDRESS) or ready_info().get("address")
                   or f"{DEFAULT_HOST}:{DEFAULT_PORT}")
    return address


def resolve_address(address: Any = None) -> Address:
    """One server's address: explicit, else from the environment (`_given`)."""
    return parse_address(_given(address))


def resolve_addresses(address: Any = None) -> List[Address]:
    """One server's address or several, explicit, else from the environment."""
    return parse_addresses(_given(address))


def find_token(token: Optional[str] = None, address: Optional[Address] = None) -> Optional[str]:
    """An explicit token, else $PSANA_IPC_TOKEN, else the file $PSANA_IPC_TOKEN_FILE
    names, else the token file in the ready file $PSANA_IPC_READY_FILE if that
    file describes the server at `address` (a token is never sent elsewhere)."""
    if token:
        return token
    if os.environ.get(ENV_TOKEN):
        return os.environ[ENV_TOKEN]
    path = os.environ.get(ENV_TOKEN_FILE)
    if not path and address is not None:
        try:
            ready = ready_info()
        except (OSError, ValueError):   # a stale or missing ready file: no token from it
            ready = {}
        if ready.get("address") and parse_address(ready["address"]) == address:
            path = ready.get("token_file")
    if path:
        with open(path) as f:
            return f.read().strip()
    return None
