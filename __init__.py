"""psana-ipc: psana's detector data served to any Python environment through shared memory.

`psana_ipc.client` is the SDK (never imports psana), `psana_ipc.server` is
`iserver` (runs in the psana environment), `psana_ipc.protocol` is what they
share.
"""
__version__ = "0.1.0"
