"""Optional packages: a missing one is an ImportError naming the extra that brings it."""
import importlib
from types import ModuleType

_HINTS = {"torch": "pip install 'psana-ipc[torch]' (with the torch build your node needs "
                   "installed first, e.g. from pytorch.org)"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module` imported, or ImportError: "<what> needs <module>: pip install ..."."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
        hint = _HINTS.get(extra, f"pip install 'psana-ipc[{extra}]'")
        raise ImportError(f"{what} needs {module}: {hint}") from None
