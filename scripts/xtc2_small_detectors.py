"""The small detectors our XTC2 writer (make_xtc2_run.py) makes, as the DAQ
writes them: per-event fields (BLD, wave8, cspad's panel, the timing system's
event codes, a line camera, EPICS PVs and scan values in transitions) and a
digitizer's channels (HSD: fex peaks every event, the raw waveform every
HSD_RAW_EVERY). Runs in the psana environment."""
from typing import List, Tuple

import numpy as np
from psana.dgramedit import AlgDef, DetectorDef, DgramEdit

from psana_ipc.server.sources.synthetic import timestamp_of

# name -> psana detector type, version of its `raw` data and its per-event
# fields {name: (dtype, rank)}: one segment, no constants
WAVE8_SAMPLES = 64
FIELD_TYPES = {
    "ebeam": ("ebeam", (2, 0, 0), {"ebeamPhotonEnergy": (np.float64, 0),
                                   "ebeamCharge": (np.float64, 0),
                                   "damageMask": (np.uint32, 0)}),
    "gasdet": ("gasdet", (1, 0, 0), {"f_11_ENRC": (np.float64, 0), "f_21_ENRC": (np.float64, 0)}),
    "wave8": ("wave8", (0, 0, 1), {f"raw_{c}": (np.uint16, 1) for c in range(8)}),
    "cspad": ("cspad", (2, 3, 42), {"arrayRaw": (np.int16, 2)}),
    "epics": ("epics", (2, 0, 0), {"HX2_DVD_GCC_01_PMON": (np.float64, 0),
                                   "XPP_VARS_FLOAT_02": (np.float64, 0)}),
    "timing": ("ts", (2, 1, 0), {"pulseId": (np.uint64, 0), "timeStamp": (np.uint64, 0),
                                 "ebeamDestn": (np.uint8, 0), "inhibitCounts": (np.uint32, 1),
                                 "sequenceValues": (np.uint16, 1)}),
    "andor": ("andor", (0, 0, 1), {"value": (np.float64, 1)}),
    "piranha4": ("piranha4", (2, 1, 0), {"image": (np.uint16, 2)}),
    "scan": ("scan", (2, 0, 0), {"motor1": (np.float64, 0), "step_value": (np.float64, 0),
                                 "step_docstring": (str, 1)}),
}
# detectors with a stream but no events: their data is in transitions
TRANSITION_ONLY = ("epics", "scan")
EPICS_EVERY = 2
ANDOR_PIXELS, PIRANHA4_PIXELS = 512, 2048
# event codes (psana's eventcodes: bit i & 15 of sequenceValues[i >> 4]) of event e
EVENT_CODES = ((1, lambda e: True), (40, lambda e: e % 2 == 0), (41, lambda e: e % 2 == 1),
               (280, lambda e: e % 3 == 0))
HSD_SEGMENTS, HSD_SAMPLES, HSD_RAW_EVERY = 2, 64, 2
HSD_CONFIG = {"user.fex.ymin": 2000, "user.fex.ymax": 2010, "user.fex.gate_ns": 200}
HSD_RAW, HSD_FEX, HSD_SKIP = 0, 1, 0x8000     # stream ids, a skip sample's flag
CSPAD_PANEL = (185, 388)


def field_value(detector: str, field: str, event: int) -> object:
    """What a non-area detector's field holds in an event (a scan's: in a step)."""
    if field == "arrayRaw":
        n = int(np.prod(CSPAD_PANEL))
        return ((np.arange(n) + 5 * event) % 3000 - 1000).astype(np.int16).reshape(CSPAD_PANEL)
    if field.startswith("raw_"):
        channel = int(field[4:])
        return ((np.arange(WAVE8_SAMPLES) * (channel + 1) + 7 * event) % 4096).astype(np.uint16)
    if detector == "timing":
        return timing_value(field, event)
    if field == "value":
        return np.arange(ANDOR_PIXELS) * 0.5 + event
    if field == "image":
        return ((np.arange(PIRANHA4_PIXELS) * 3 + 11 * event) % 4096).astype(np.uint16)[None]
    if field == "step_docstring":
        return f'{{"detname": "scan", "step": {event}}}'
    if field == "damageMask":
        return np.uint32(event % 3)
    offset = {"ebeamPhotonEnergy": 9500.0, "ebeamCharge": 0.25, "HX2_DVD_GCC_01_PMON": 41.0,
              "motor1": 10.0, "step_value": 0.0}.get(field, 1.5)
    return np.float64(offset + event / 7.0)


def timing_value(field: str, event: int) -> object:
    if field == "sequenceValues":
        words = np.zeros(18, np.uint16)
        for code, held in EVENT_CODES:
            if held(event):
                words[code >> 4] |= 1 << (code & 15)
        return words
    if field == "inhibitCounts":
        return np.arange(8, dtype=np.uint32) * (event + 1)
    return {"pulseId": np.uint64(100000 + event), "timeStamp": np.uint64(timestamp_of(event)),
            "ebeamDestn": np.uint8(event % 4)}[field]


def hsd_peaks(segment: int, event: int) -> List[Tuple[int, np.ndarray]]:
    """The fex peaks of a channel in an event: (start sample, samples); starts
    and lengths are multiples of 4, as the firmware writes them."""
    peaks = []
    for k in range(1 + (event + segment) % 3):
        length = 4 * (1 + (event + k) % 3)
        samples = 2050 + 10 * segment + 3 * k + (np.arange(length) + event) % 7
        peaks.append((8 + 32 * k + 4 * (event % 2), samples.astype(np.uint16)))
    return peaks


def hsd_waveform(segment: int, event: int) -> np.ndarray:
    return ((np.arange(HSD_SAMPLES) * (segment + 1) + 13 * event) % 4096).astype(np.uint16)


def hsd_stream(stream: int, samples: np.ndarray) -> bytes:
    """One stream of a channel: its header (sample count, stream id), then the samples."""
    header = np.array([len(samples), stream << 24, 0, 0], np.uint32)
    return header.tobytes() + samples.astype(np.uint16).tobytes()


def hsd_fex(peaks: List[Tuple[int, np.ndarray]]) -> np.ndarray:
    """Peaks in the firmware's sparse form: a group of 4 skip samples (their
    counts summed) before each peak, its samples, 4 skip samples after the last."""
    words: List[int] = []
    position = 0
    for start, samples in peaks:
        words += [HSD_SKIP | (start - position)] + [HSD_SKIP] * 3
        words += [int(v) for v in samples]
        position = start + len(samples)
    return np.array(words + [HSD_SKIP] * 4, np.uint16)


def hsd_channel(segment: int, event: int) -> Tuple[np.ndarray, np.ndarray]:
    """A channel's event header (which streams follow) and its data."""
    streams = hsd_stream(HSD_FEX, hsd_fex(hsd_peaks(segment, event)))
    present = 1 << HSD_FEX
    if event % HSD_RAW_EVERY == 0:
        streams = hsd_stream(HSD_RAW, hsd_waveform(segment, event)) + streams
        present |= 1 << HSD_RAW
    header = np.zeros(8, np.uint32)
    header[0] = present << 20
    return header, np.frombuffer(streams, np.uint8).copy()


def declare_fields(config: DgramEdit, detector: str, node: int) -> List:
    """One segment holding the detector's per-event fields."""
    dettype, version, fields = FIELD_TYPES[detector]
    serial = DetectorDef(detector, dettype, f"{detector}-0")
    return [config.Detector(serial, AlgDef("raw", *version), dict(fields), nodeId=node, segment=0)]


def declare_hsd(config: DgramEdit, detector: str, node: int) -> List:
    """One segment per channel, each with the config psana pads peaks by."""
    serial = DetectorDef(detector, "hsd", f"{detector}-0")
    segments = []
    for seg in range(HSD_SEGMENTS):
        segments.append(config.Detector(serial, AlgDef("raw", 2, 0, 0),
                                        {"eventHeader": (np.uint32, 1), "chan00": (np.uint8, 1)},
                                        nodeId=node, segment=seg))
        cfg = config.Detector(serial, AlgDef("config", 2, 0, 0),
                              {name: (np.int64, 0) for name in HSD_CONFIG},
                              nodeId=node, segment=seg)
        for name, value in HSD_CONFIG.items():
            setattr(cfg.config, name, np.int64(value))
        config.adddata(cfg.config)
    return segments
