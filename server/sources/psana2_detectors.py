"""What a psana2 detector is, which modes it offers, which events hold it,
and which per-event values psana gives for it.

A run holds detectors of every kind; psana picks each interface's class
(`<dettype>_<alg>_<version>`) from what the run declares, so the class says
what the detector can give (the first rule that fits):

    digitizer  `waveforms` and `peaks` (hsd): modes waveforms (the raw
               waveforms, present in the events the digitizer kept them) and
               padded (psana's fex peaks laid into the full window), each
               (channels, samples); its peaks are the field `<det>.<iface>.peaks`
    waveform   a digitizer whose channels psana stacks (wave8 `raw_all`):
               raw only, as a (channels, samples) array
    line       a camera whose `raw` psana declares one-dimensional (piranha4,
               andor): raw, and calib where its class has one; never assembled
    area       an AreaDetector (epix10ka, jungfrau, opal, cspad, ...): those
               of raw, calib and image its class has, and mask where the class
               has `_mask` and psana has a mask for it
    array      any other class giving raw or calib arrays: those of the two it has
    timing     the timing system (psana's `eventcodes`): no frames; its values
               are fields (`timing.eventcodes`), and it chooses events by code
    scalar     everything else (EBeam, gas detectors, beam monitors, ...): no
               frames; its values are fields (`ebeam.ebeamPhotonEnergy`)

The run's EPICS PVs, scan variables and steps are pseudo-detectors (see
psana2_env). Any per-event value is also served as a frame by its field
name (`ebeam.ebeamPhotonEnergy`, `xpphsd.hsd.peaks`).

Which events hold a detector is known without reading them: the run's
timestamp table lists, per event, the streams that have a record of it, and
a stream's Configure record lists its detectors; an event holds a detector
when it has a record of every stream declaring it. Detectors read out at a
lower rate are simply absent from the other events' records.
"""
import inspect
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Set, Tuple

from psana_ipc.protocol.errors import NO_DATA, NOT_AN_ARRAY

from .base import SourceError

AREA, LINE, ARRAY, WAVEFORM, DIGITIZER, TIMING, SCALAR = (
    "area", "line", "array", "waveform", "digitizer", "timing", "scalar")
AREA_MODES = ("raw", "calib", "image")
DIGITIZER_MODES = ("waveforms", "padded")     # psana's methods of the same names
NOT_PER_EVENT = ("config",)                   # psana's configuration, the same every event


def has(obj: Any, name: str) -> bool:
    return callable(getattr(obj, name, None))


def declared_1d(method: Any) -> bool:
    """Whether psana declares the method's answer one-dimensional (amitypes' Array1d)."""
    declared = getattr(method, "__annotations__", {}).get("return")
    return getattr(declared, "__name__", None) == "Array1d"


def kind_of(iface: Any) -> str:
    """The kind of a psana interface object or class (see the module docstring)."""
    if has(iface, "waveforms") and has(iface, "peaks"):
        return DIGITIZER
    if has(iface, "raw_all"):
        return WAVEFORM
    if has(iface, "raw") and declared_1d(iface.raw):
        return LINE
    if has(iface, "calib") and has(iface, "image"):
        return AREA
    if has(iface, "raw") or has(iface, "calib"):
        return ARRAY
    if has(iface, "eventcodes"):
        return TIMING
    return SCALAR


def offered_modes(iface: Any, has_mask: bool) -> Tuple[str, ...]:
    """The modes a psana interface object or class offers; `has_mask`: psana
    has a pixel mask for it (only asked of classes that have `_mask`)."""
    kind = kind_of(iface)
    if kind == AREA:
        methods = tuple(m for m in AREA_MODES if has(iface, m))
        return methods + (("mask",) if has_mask and has(iface, "_mask") else ())
    if kind in (LINE, ARRAY):
        return tuple(m for m in ("raw", "calib") if has(iface, m))
    if kind == WAVEFORM:
        return ("raw",)
    if kind == DIGITIZER:
        return tuple(m for m in DIGITIZER_MODES if has(iface, m))
    return ()


def main_interface(classes: Dict[str, Any]) -> str:
    """The interface a detector's frames come from: `raw`, or, for a class
    that names its only interface otherwise (hsd's `hsd`, ts's `ts`), that."""
    return "raw" if "raw" in classes or not classes else sorted(classes)[0]


def frame_method(iface: Any, mode: str) -> Callable[[Any], Any]:
    """The per-event call that gives the detector's frame in `mode`."""
    if mode == "raw" and kind_of(iface) == WAVEFORM:
        return iface.raw_all
    return getattr(iface, mode)


def per_event(cls: Any, name: str) -> bool:
    """Whether psana's attribute `name` of an interface class is a per-event
    value, called with the event (psana adds some per detector object, when
    it is made: those always are)."""
    if name in NOT_PER_EVENT or "." in name or name.startswith("_"):
        return False
    method = getattr(cls, name, None)
    if method is None:
        return True
    try:
        return "evt" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def field_names(detector: str, classes: Dict[str, Any],
                listed: Dict[Tuple[str, str], Any]) -> List[str]:
    """The fields a detector offers: each interface's per-event attributes
    that psana lists for it (`run.detinfo`), named as a get names them."""
    names = []
    for iface, cls in sorted(classes.items()):
        attributes = listed.get((detector, iface))
        for attribute in attributes if isinstance(attributes, list) else ():
            if per_event(cls, attribute):
                names.append(f"{detector}.{attribute}" if iface == "raw"
                             else f"{detector}.{iface}.{attribute}")
    return names


def no_frames(detector: str, kind: str, fields: Sequence[str]) -> SourceError:
    """Why a detector serves no frames, and what to ask for instead."""
    if not fields:
        return SourceError(NOT_AN_ARRAY, f"{detector} gives no per-event data: psana's class "
                                         f"for it offers none (only its configuration, such as "
                                         f"the names of the run's EPICS PVs, whose values are "
                                         f"fields 'epics.<variable>')")
    shown = ", ".join(repr(f) for f in fields[:6]) + (", ..." if len(fields) > 6 else "")
    return SourceError(NOT_AN_ARRAY, f"{detector} is a {kind} detector and serves no frames; "
                                     f"its values are fields ({shown}): ask for them beside "
                                     f"another detector's frame, or for one as a frame by its "
                                     f"own name")


def streams_of(configs: Sequence[Any], detector: str) -> Set[int]:
    """The streams whose Configure record declares `detector` (under `software`,
    where psana lists every detector of a stream)."""
    return {i for i, config in enumerate(configs)
            if hasattr(getattr(config, "software", None), detector)}


def events_with(event_streams: Sequence[FrozenSet[int]], streams: Set[int]) -> List[int]:
    """Indices of the events with a record in every one of `streams` (psana
    gives a detector's data only when all of its segments are there, and a
    detector may spread its segments over several streams); events share few
    distinct stream sets, so each set is judged once."""
    judged: Dict[FrozenSet[int], bool] = {}
    held = []
    for i, present in enumerate(event_streams):
        hit = judged.get(present)
        if hit is None:
            hit = judged[present] = bool(streams) and streams <= present
        if hit:
            held.append(i)
    return held


def holds(evt: Any, detector: str, interface: str = "raw") -> bool:
    """Whether psana's event has a record of the detector's interface."""
    return (detector, interface) in getattr(evt, "_det_segments", {})


def missing(detector: str, index: int) -> SourceError:
    return SourceError(NO_DATA, f"event {index} holds no data of {detector} (the detector "
                                f"is read out in other events only)")
