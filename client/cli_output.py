"""What `psana-ipc` prints for people: aligned tables, sizes in KiB/MiB/GiB,
shapes as 16×352×384, ISO times; `--json` prints the raw data instead."""
import datetime
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from psana_ipc.protocol.messages import frame_nbytes
from psana_ipc.protocol.units import format_bytes

# psana2 packs seconds since the EPICS epoch (1990-01-01 UTC) and nanoseconds in one int.
EPICS_EPOCH = 631152000


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


def shape(dims: Sequence[int]) -> str:
    return "×".join(str(int(d)) for d in dims) or "scalar"


def iso_time(timestamp: Optional[Mapping[str, int]]) -> str:
    """A frame descriptor's timestamp as UTC ISO 8601 with nanoseconds ('-' if none).
    psana1 gives Unix `seconds`; psana2 a packed `time` since the EPICS epoch."""
    if not timestamp:
        return "-"
    if "seconds" in timestamp:
        seconds, nanoseconds = timestamp["seconds"], timestamp.get("nanoseconds", 0)
    else:
        seconds, nanoseconds = (timestamp["time"] >> 32) + EPICS_EPOCH, timestamp["time"] & 0xFFFFFFFF
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{nanoseconds:09d}Z"


def number(x: Any) -> str:
    """4 significant digits for floats, integers as they are."""
    return f"{x:.4g}" if isinstance(x, (float, np.floating)) else str(x)


def calibrated(mode: str, flag: Optional[bool]) -> str:
    if mode in ("raw", "mask"):
        return "n/a"
    return "yes" if flag else "no (raw values: no constants)"


def info_text(exp: str, run: int, detector: Optional[str], info: Dict[str, Any]) -> str:
    """A run's detectors, or one detector's modes."""
    if detector is None:
        rows = [(name, d.get("events", "?"), shape(d["shape"]) if "shape" in d else "")
                for name, d in sorted(info.get("detectors", {}).items())]
        return f"{exp} run {run}: {len(rows)} detector(s)\n" + \
            table(rows, ("detector", "events", "shape"))
    rows = []
    for mode, spec in info["modes"].items():
        nbytes = frame_nbytes(spec["shape"], np.dtype(spec["dtype"]).itemsize)
        rows.append((mode, shape(spec["shape"]), spec["dtype"], format_bytes(nbytes),
                     calibrated(mode, spec.get("calibrated"))))
    return f"{exp} run {run} {detector}: {info['events']} events\n" + \
        table(rows, ("mode", "shape", "dtype", "frame", "calibrated"))


def stats_text(stats: Dict[str, Any]) -> str:
    """Counters and gauges, sizes in human units."""
    errors = ", ".join(f"{code} {n}" for code, n in sorted(stats.get("errors", {}).items()))
    lines: List[Any] = []
    for key, value in stats.items():
        if key == "errors":
            value = errors or "none"
        elif key == "bytes" or key.startswith("shm_"):
            value = format_bytes(value)
        lines.append((key.replace("_", " "), value))
    return table(lines, ("", "")).split("\n", 1)[1]


def frame_text(detector: str, event: int, mode: str, frame: np.ndarray,
               desc: Dict[str, Any]) -> str:
    """One frame's summary."""
    return table([("shape", f"{shape(frame.shape)} {frame.dtype} ({format_bytes(frame.nbytes)})"),
                  ("min / max", f"{number(frame.min())} / {number(frame.max())}"),
                  ("mean", number(float(frame.mean()))),
                  ("calibrated", calibrated(mode, desc.get("calibrated"))),
                  ("time", iso_time(desc.get("timestamp")))],
                 (f"{detector} event {event}", mode))
