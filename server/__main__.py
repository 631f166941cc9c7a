"""`python -m psana_ipc.server`: the same as `iserver`."""
import sys

from .cli import main

sys.exit(main())
