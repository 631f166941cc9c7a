"""Keeping runs of one process apart although psana shares detector objects.

psana 4.3.4 keeps one detector interface object per detector name and
interface in a process (`DetectorImpl._registry`, key "<name>:raw") and one
`CalibConstants` object per detector name (`CalibConstants._registry`).
Opening a run re-initialises those objects with that run's configuration,
and `run.Detector(name)` with that run's constants, so a worker serving two
runs of the same detector would calibrate the first with the second's
constants.

A `RunDetector` is one run's detector. It remembers which of them the shared
objects currently belong to, and before a read puts its own attributes back
if another run used the objects since. Swapping attribute dicts costs
microseconds; calling `run.Detector()` again instead would drop psana's
calibration and geometry caches, which take up to seconds to rebuild.
"""
from typing import Any, Dict, List, Tuple

# detector name -> the RunDetector whose state the shared objects hold now
_holders: Dict[str, "RunDetector"] = {}


def release_all() -> None:
    """Save every holder's state; call before psana touches the shared
    objects on its own, i.e. before opening a run."""
    for holder in list(_holders.values()):
        holder.release()


class RunDetector:
    """`run.Detector(name)` of one run, created once, with its own state;
    `interface`: the one its frames come from (usually `raw`)."""

    def __init__(self, run: Any, name: str, interface: str = "raw") -> None:
        holder = _holders.get(name)
        if holder is not None:
            holder.release()
        self.name = name
        self.interface = interface
        self.container = run.Detector(name)     # one attribute per interface: raw, fex, ...
        self.iface = getattr(self.container, interface, None)
        self._saved: List[Tuple[Any, Dict[str, Any]]] = []
        _holders[name] = self

    def use(self) -> Any:
        """The frames' interface (`det.raw`), holding this run's state."""
        holder = _holders.get(self.name)
        if holder is not self:
            if holder is not None:
                holder.release()
            for obj, state in self._saved:
                vars(obj).clear()
                vars(obj).update(state)
            _holders[self.name] = self
        return self.iface

    def release(self) -> None:
        """Save this run's state of the shared objects; it no longer holds them."""
        objects = [self.iface] if self.iface is not None else []
        constants = getattr(self.iface, "_calibc_", None)
        if constants is not None:
            objects.append(constants)
        self._saved = [(obj, dict(vars(obj))) for obj in objects]
        if _holders.get(self.name) is self:
            del _holders[self.name]

    def forget(self) -> None:
        """The run is closed: drop any claim on the shared objects."""
        if _holders.get(self.name) is self:
            del _holders[self.name]
        self._saved = []
