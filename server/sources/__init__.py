"""Data sources, looked up by the name given to `iserver --source`.

Modules are imported only when their source is used or their options are
listed, and none of them imports psana or h5py at import time. A site (or a
test) adds its own source without editing this package: $PSANA_IPC_SOURCES
holds `name=module` pairs, comma-separated, each module defining `Factory`.
"""
import argparse
import importlib
import importlib.util
import os
from typing import Any, Dict, Type

from .base import SourceFactory

ENV_SOURCES = "PSANA_IPC_SOURCES"
SOURCES: Dict[str, str] = {
    "synthetic": "psana_ipc.server.sources.synthetic",
    "psana2": "psana_ipc.server.sources.psana2",
    "psana1": "psana_ipc.server.sources.psana1",
    "hdf5": "psana_ipc.server.sources.hdf5",
}


def registry() -> Dict[str, str]:
    """The built-in sources plus those $PSANA_IPC_SOURCES adds (built-in names win)."""
    extra = {}
    for item in os.environ.get(ENV_SOURCES, "").split(","):
        name, sep, module = item.partition("=")
        if sep and name.strip() and module.strip():
            extra[name.strip()] = module.strip()
    extra.update(SOURCES)
    return extra


def available() -> Dict[str, str]:
    """Source names whose module exists in this installation."""
    found = {}
    for name, module in registry().items():
        try:
            if importlib.util.find_spec(module) is not None:
                found[name] = module
        except ImportError:   # a parent package of an added source is missing
            pass
    return found


def factory_class(name: str) -> Type[SourceFactory]:
    return importlib.import_module(registry()[name]).Factory


def source_options(**overrides: Any) -> argparse.Namespace:
    """Every available source's options at their iserver defaults, then
    `overrides` (e.g. data_dir=, calib_dir=, offline=), without a command line;
    an unknown name is a TypeError."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in sorted(available()):
        factory_class(name).add_arguments(parser)
    namespace = parser.parse_args([])
    unknown = set(overrides) - set(vars(namespace))
    if unknown:
        raise TypeError(f"unknown source option(s): {', '.join(sorted(unknown))}")
    vars(namespace).update(overrides)
    return namespace
