"""Data sources, looked up by the name given to `iserver --source`.

Modules are imported only when their source is used or their options are
listed, and none of them imports psana or h5py at import time.
"""
import importlib
import importlib.util
from typing import Dict, Type

from .base import SourceFactory

SOURCES: Dict[str, str] = {
    "synthetic": "psana_ipc.server.sources.synthetic",
    "psana2": "psana_ipc.server.sources.psana2",
    "psana1": "psana_ipc.server.sources.psana1",
    "hdf5": "psana_ipc.server.sources.hdf5",
}


def available() -> Dict[str, str]:
    """Source names whose module exists in this installation."""
    found = {}
    for name, module in SOURCES.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = module
    return found


def factory_class(name: str) -> Type[SourceFactory]:
    return importlib.import_module(SOURCES[name]).Factory
