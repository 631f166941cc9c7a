"""Where a psana2 run's files are, and telling psana exactly which they are.

psana finds a run's files by asking the LCLS logbook, or, when it answers
nothing (offline, off-site), by globbing `<dir>/smalldata/*r<run:04d>-s*`,
which also matches every other experiment's run of that number in the same
directory (psana then fails deep inside). The server lists the run's files
itself and hands psana that list as the logbook's answer, so psana reads
exactly those and needs no network to find them.

A run of experiment `exp` is looked for in the first of these given:

  --files FILE ...   only among these XTC2 files, named as the DAQ names them,
                     <exp>-r<run:04d>-s<stream:03d>-c<chunk:03d>.xtc2: each
                     makes the run its name gives (how psana's
                     DataSource(files=...) is used); a run's files share one
                     directory
  --data-dir DIR     DIR, which may hold runs of several experiments; with
                     `{exp}` (and `{instrument}`) in it, one directory per
                     experiment, e.g. /data/{exp}/xtc
  --data-root ROOT   the facility layout ROOT/<instrument>/<exp>/xtc, the
                     instrument being the experiment's first three letters
                     (lower case as psana2 writes it, upper case where only
                     that exists); default $SIT_PSDM_DATA (at S3DF
                     /sdf/data/lcls/ds), else psana's /reg/d/psdm

A run is its streams' chunk-0 files, <exp>-r<run:04d>-s*-c000.xtc2 (psana
finds the later chunks from the small data), each with its small data in
smalldata/<same name>.smd.xtc2, which random access needs. A run the DAQ is
still writing has its files under those names plus `.inprogress` (see
growing_files): such a run is found in a directory (not among --files,
whose names must exist at start) and is `live` while any of its small-data
files is still being written.
"""
import argparse
import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from psana_ipc.protocol.errors import NOT_FOUND

from ..startup import StartupError
from .base import SourceError
from .growing_files import INPROGRESS, final_name, in_progress, present_name
from .psana_common import experiment_path

DAQ_NAME = re.compile(r"(?P<exp>[A-Za-z0-9_]+)-r(?P<run>\d{4})"
                      r"-s(?P<stream>\d{3})-c(?P<chunk>\d{3})\.xtc2")
DEFAULT_ROOT = "/reg/d/psdm"


@dataclass(frozen=True)
class RunFiles:
    """One run's chunk-0 files: their directory and their (final) names;
    `live`: the DAQ is still writing the run."""
    directory: str
    names: Tuple[str, ...]
    live: bool = False

    def smalldata(self) -> List[str]:
        return [str(smalldata_of(self.directory, name)) for name in self.names]

    def chunk0(self) -> List[str]:
        return [os.path.join(self.directory, name) for name in self.names]


def smalldata_of(directory: str, name: str) -> Path:
    return Path(directory) / "smalldata" / name.replace(".xtc2", ".smd.xtc2")


def instrument_dir(root: str, exp: str) -> Path:
    """ROOT/<instrument>/<exp>/xtc, the instrument's directory lower case
    (psana2's rule) or, where only that exists, upper case."""
    lower = Path(root) / exp[:3].lower() / exp / "xtc"
    upper = Path(root) / exp[:3].upper() / exp / "xtc"
    return upper if not lower.is_dir() and upper.is_dir() else lower


def runs_of_files(files: List[str]) -> Dict[Tuple[str, int], RunFiles]:
    """The runs a list of DAQ-named XTC2 files makes; StartupError on a file
    psana could not serve."""
    runs: Dict[Tuple[str, int], List[Path]] = {}
    for name in files:
        path = Path(name).resolve()
        found = DAQ_NAME.fullmatch(path.name)
        if found is None:
            raise StartupError(f"--files {name}: not an XTC2 file named as the DAQ names "
                               f"them, <exp>-r<run:04d>-s<stream:03d>-c<chunk:03d>.xtc2")
        if not path.is_file():
            raise StartupError(f"--files {name}: no such file")
        if found["chunk"] == "000":
            runs.setdefault((found["exp"], int(found["run"])), []).append(path)
    listed = {}
    for (exp, run), paths in runs.items():
        directories = {str(p.parent) for p in paths}
        if len(directories) > 1:
            raise StartupError(f"--files: run {run} of {exp} is spread over "
                               f"{', '.join(sorted(directories))}; psana reads a run from "
                               f"one directory")
        listed[(exp, run)] = RunFiles(directories.pop(), tuple(sorted(p.name for p in paths)))
    return listed


def run_directory(exp: str, options: argparse.Namespace) -> str:
    if options.data_dir:
        return experiment_path(options.data_dir, exp)
    root = options.data_root or os.environ.get("SIT_PSDM_DATA") or DEFAULT_ROOT
    return str(instrument_dir(root, exp))


def find_run(exp: str, run: int, options: argparse.Namespace,
             listed: Dict[Tuple[str, int], RunFiles]) -> RunFiles:
    """The files of run `run` of `exp`; NOT_FOUND naming where it looked."""
    if listed:
        if (exp, run) not in listed:
            raise SourceError(NOT_FOUND, f"run {run} of {exp} not found in the files given "
                                         f"(--files): they hold " + ", ".join(
                                             f"run {r} of {e}" for e, r in sorted(listed)))
        found = listed[(exp, run)]
    else:
        directory = run_directory(exp, options)
        pattern = f"{exp}-r{run:04d}-s*-c000.xtc2"
        names = tuple(sorted({final_name(p.name) for p in Path(directory).glob(pattern + "*")
                              if final_name(p.name).endswith(".xtc2")}))
        if not names:
            raise SourceError(NOT_FOUND, f"run {run} of {exp} not found in {directory} (no "
                                         f"{pattern} there, nor {pattern}{INPROGRESS})")
        found = RunFiles(directory, names)
    smalldata = found.smalldata()
    missing = [n for n, path in zip(found.names, smalldata) if present_name(path) is None]
    if missing:
        raise SourceError(NOT_FOUND, f"run {run} of {exp}: no small data for {', '.join(missing)} "
                                     f"in {found.directory}/smalldata (random access needs it)")
    return dataclasses.replace(found, live=any(map(in_progress, smalldata)))


def next_run(exp: str, run: int, options: argparse.Namespace,
             listed: Dict[Tuple[str, int], RunFiles]) -> Optional[int]:
    """The first run of `exp` after `run` that has files, or None."""
    if listed:
        later = [r for e, r in listed if e == exp and r > run]
    else:
        names = (p.name for p in Path(run_directory(exp, options)).glob(f"{exp}-r*-c000.xtc2*"))
        found = (DAQ_NAME.fullmatch(final_name(name)) for name in names)
        later = [int(m["run"]) for m in found if m and m["exp"] == exp and int(m["run"]) > run]
    return min(later, default=None)


def file_check(self: Any, path: str) -> Tuple[bool, str]:
    """psana's check that a file exists, answering with whichever name it has
    (psana 4.3.4 opens a `.inprogress` name only in its live mode, which
    waits for the run's end; the server follows a growing run itself)."""
    name = present_name(path)
    return name is not None, name or path


@contextlib.contextmanager
def files_listed(files: RunFiles) -> Iterator[None]:
    """While a DataSource opens, psana's logbook lookup of the run's files
    answers with `files` (what the logbook would say) and its file check
    finds a file under either name; afterwards psana is as it was."""
    from psana.psexp.ds_base import DataSourceBase
    lookup = DataSourceBase._get_file_info_from_db
    check = DataSourceBase._check_file_exist_with_retry
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {
        "xtc_files": list(files.names), "dirname": files.directory}
    DataSourceBase._check_file_exist_with_retry = file_check
    try:
        yield
    finally:
        DataSourceBase._get_file_info_from_db = lookup
        DataSourceBase._check_file_exist_with_retry = check


def add_arguments(group: Any) -> None:
    """The options above, in the psana2 source's group of iserver options."""
    group.add_argument("--data-dir", metavar="DIR",
                       help="directory of the runs' XTC2 files (psana's dir=); may hold several "
                            "experiments; `{exp}` in DIR makes one per experiment, e.g. "
                            "/data/{exp}/xtc")
    group.add_argument("--data-root", metavar="ROOT",
                       help="facility layout ROOT/<instrument>/<exp>/xtc (default: "
                            "$SIT_PSDM_DATA, at S3DF /sdf/data/lcls/ds)")
    group.add_argument("--files", nargs="+", metavar="FILE", default=[],
                       help="serve the runs these DAQ-named XTC2 files make "
                            "(<exp>-r<run>-s<stream>-c<chunk>.xtc2, small data in smalldata/ "
                            "beside them), as psana's DataSource(files=...)")
