"""HDF5 and CXI files (`--source hdf5`), read with h5py.

A run is a file: `--hdf5-pattern` (default `{exp}/r{run:04d}.h5`) names it,
relative to `--hdf5-root` unless the pattern is absolute. A detector is a
dataset inside that file: `--hdf5-dataset` (default `{detector}`) with the
detector name filled in. By default a client asks for detector
`entry_1/data_1/data` of a CXI file; with `--hdf5-dataset
'entry_1/{detector}/data'` it asks for `data_1`. `info` without a detector
lists every numeric dataset of two or more dimensions whose path fits the
template (soft links are not followed there, but work in requests).

Events run along the first axis. The modes are what a file can honestly
give without constants or geometry:

- raw: the frame as stored (any chunking and compression h5py reads);
- calib: the same values as float32, flagged `calibrated: false` because
  the server applies no constants (the file may hold calibrated data, or
  not: only its writer knows);
- image: as calib, for 2-D frames only, which already are images.

There is no mask and no timestamp.
"""
import argparse
import os
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from psana_ipc.protocol.errors import BAD_REQUEST, NOT_FOUND, UNKNOWN_DETECTOR
from psana_ipc.protocol.messages import RunKey

from .base import Allocator, FrameMeta, FrameSpec, Source, SourceError, SourceFactory

NUMERIC_KINDS = "iuf"


def is_frames(obj: Any) -> bool:
    """A numeric dataset with an event axis and at least 1-D frames."""
    dtype = getattr(obj, "dtype", None)
    return dtype is not None and dtype.kind in NUMERIC_KINDS and len(obj.shape) >= 2


def detector_pattern(template: str) -> "re.Pattern":
    """The inverse of `--hdf5-dataset`: dataset path -> detector name."""
    parts = template.lstrip("/").split("{detector}")
    return re.compile("(?P<detector>.+)".join(re.escape(p) for p in parts))


class Hdf5Source(Source):
    """Frames of one dataset, read straight into the memory they are served from."""

    def __init__(self, file: Any, dataset: Any) -> None:
        self._file = file
        self._data = dataset
        frame = tuple(dataset.shape[1:])
        self._specs = {"raw": FrameSpec(frame, str(dataset.dtype)),
                       "calib": FrameSpec(frame, "float32", calibrated=False)}
        if len(frame) == 2:
            self._specs["image"] = self._specs["calib"]

    def __len__(self) -> int:
        return self._data.shape[0]

    def specs(self) -> Dict[str, FrameSpec]:
        return self._specs

    def read(self, index: int, mode: str) -> Tuple[np.ndarray, FrameMeta]:
        return self.read_into(index, mode, np.empty)

    def read_into(self, index: int, mode: str, allocate: Allocator) -> Tuple[np.ndarray, FrameMeta]:
        """HDF5 decompresses, and converts to float32 where asked, into `out`."""
        self.check(index, mode)
        spec = self._specs[mode]
        out = allocate(spec.shape, np.dtype(spec.dtype))
        self._data.read_direct(out, np.s_[index])
        return out, FrameMeta(calibrated=spec.calibrated)

    def close(self) -> None:
        self._file.close()


class Factory(SourceFactory):
    name = "hdf5"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("hdf5 source")
        group.add_argument("--hdf5-root", default=".", metavar="DIR",
                           help="directory a relative --hdf5-pattern starts from "
                                "(default: the current directory)")
        group.add_argument("--hdf5-pattern", default="{exp}/r{run:04d}.h5", metavar="PATTERN",
                           help="file of a run, from {exp} and {run} (default: %(default)s)")
        group.add_argument("--hdf5-dataset", default="{detector}", metavar="TEMPLATE",
                           help="dataset path of a detector inside the file, from {detector} "
                                "(default: %(default)s, i.e. the detector name is the path)")

    def path(self, exp: str, run: int) -> str:
        if "/" in exp or exp in ("", ".", ".."):
            raise SourceError(BAD_REQUEST, f"experiment name {exp!r} is not a plain name")
        return os.path.join(self.options.hdf5_root,
                            self.options.hdf5_pattern.format(exp=exp, run=run))

    def _file(self, exp: str, run: int) -> Any:
        import h5py
        path = self.path(exp, run)
        if not os.path.isfile(path):
            raise SourceError(NOT_FOUND, f"no file {path} for exp={exp} run={run}")
        return h5py.File(path, "r")

    def open(self, key: RunKey) -> Source:
        file = self._file(key.exp, key.run)
        name = self.options.hdf5_dataset.format(detector=key.detector)
        dataset: Optional[Any] = file.get(name)
        if not is_frames(dataset):
            message = f"{file.filename} has no numeric dataset {name!r} of two or more dimensions"
            file.close()
            raise SourceError(UNKNOWN_DETECTOR, message)
        return Hdf5Source(file, dataset)

    def detectors(self, exp: str, run: int) -> Dict[str, Dict[str, Any]]:
        pattern = detector_pattern(self.options.hdf5_dataset)
        found: Dict[str, Dict[str, Any]] = {}

        def visit(path: str, obj: Any) -> None:
            match = pattern.fullmatch(path)
            if match and is_frames(obj):
                found[match.group("detector")] = {"path": path, "events": obj.shape[0],
                                                  "shape": list(obj.shape[1:]),
                                                  "dtype": str(obj.dtype)}

        with self._file(exp, run) as file:
            file.visititems(visit)
        return found
