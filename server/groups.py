"""Connection groups: the connections of one client (a dataset or a loader
and its DataLoader workers), which share batch buffers and a fair share of
the budget.

A group is named by an id the server issues in the hello reply
(`issue_group`) and checks when another connection presents it
(`group_is_ours`): both an HMAC under a key the master makes at import,
before it forks, so every worker (also one started later) can check an id
without shared state, and an id cannot be made up. The index knows a group
by a 62-bit key derived from its id (`group_key`).
"""
import hashlib
import hmac
import secrets

GROUP_KEY = secrets.token_bytes(32)   # made in the master at import; forked workers share it


def _mac(text: str) -> str:
    return hmac.new(GROUP_KEY, f"group:{text}".encode(), hashlib.sha256).hexdigest()[:16]


def issue_group() -> str:
    """A new connection group id, which only this server can have made."""
    nonce = secrets.token_hex(8)
    return f"{nonce}.{_mac(nonce)}"


def group_is_ours(group: str) -> bool:
    nonce, _, mac = group.partition(".")
    return bool(nonce) and hmac.compare_digest(mac.encode(), _mac(nonce).encode())


def group_key(group: str) -> int:
    """The index's key for a group id: never 0 (0 is no group)."""
    digest = hashlib.blake2b(group.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2 | 1


def lone_key() -> int:
    """A key for a connection that is a group of its own (the legacy dialect)."""
    return secrets.randbits(62) | 1
