"""The psana-ipc client SDK: runs in any Python environment, never imports psana.

`Client` is plain numpy; `IPCRemotePsanaDataset`, `RunDataset`,
`BatchLoader`, `ElasticSampler` and `ResumableDataLoader` need torch and are
imported on first use, so the SDK works without torch.
"""
from typing import Any

from psana_ipc.protocol.errors import ServerError

from .client import Client
from .frame import Frame
from .optional import require

__all__ = ["Client", "Frame", "ServerError", "IPCRemotePsanaDataset", "RunDataset",
           "BatchLoader", "ElasticSampler", "ResumableDataLoader", "LiveRunDataset"]
_LAZY = {"IPCRemotePsanaDataset": ".dataset", "RunDataset": ".dataset",
         "BatchLoader": ".batch_loader", "ElasticSampler": ".sampler",
         "ResumableDataLoader": ".resumable_loader", "LiveRunDataset": ".live_dataset"}
_NEED_TORCH = (".dataset", ".sampler", ".resumable_loader", ".live_dataset")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        if _LAZY[name] in _NEED_TORCH:
            require("torch", "torch", name)
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
