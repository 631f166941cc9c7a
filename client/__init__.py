"""The psana-ipc client SDK: runs in any Python environment, never imports psana.

`Client` is plain numpy; `IPCRemotePsanaDataset`, `RunDataset` and
`BatchLoader` need torch and are imported on first use, so the SDK works
without torch.
"""
from typing import Any

from psana_ipc.protocol.errors import ServerError

from .connection import Client, Frame
from .optional import require

__all__ = ["Client", "Frame", "ServerError", "IPCRemotePsanaDataset", "RunDataset",
           "BatchLoader", "LiveRunDataset"]
_LAZY = {"IPCRemotePsanaDataset": ".dataset", "RunDataset": ".dataset",
         "BatchLoader": ".batch_loader", "LiveRunDataset": ".live_dataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        if _LAZY[name] in (".dataset", ".live_dataset"):
            require("torch", "torch", name)
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
