"""Byte sizes as people write and read them: `parse_size("4G")`, `format_bytes(1536)`."""
import re

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.I)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1048576` -> bytes (powers of 1024); ValueError otherwise."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 11418992640 -> '10.6 GiB'."""
    k = 0
    while k < len(_UNITS) - 1 and abs(n) >= 1024 ** (k + 1):
        k += 1
    return f"{int(n)} B" if k == 0 else f"{n / 1024 ** k:.1f} {_UNITS[k]}"
