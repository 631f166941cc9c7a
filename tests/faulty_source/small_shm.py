"""Run inside a mount namespace whose /dev/shm is a tmpfs of a few MiB (see
tests/server/test_faults.py): a server with a budget far above what /dev/shm
holds is asked for frames that do not fit there. v1 frames are in the
server's pool, which is not in /dev/shm; a legacy segment is. Prints, as JSON, what was
served or refused and what /dev/shm held after each request and at the end."""
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from psana_ipc.client import Client, ServerError, legacy
from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol.shm_names import parse_lock_name
from psana_ipc.server.sources.synthetic import expected

from conftest import ServerProcess


def _segments() -> list:
    """What /dev/shm holds besides the live server's lock file."""
    return sorted(n for n in os.listdir("/dev/shm") if parse_lock_name(n) is None)


def _code(call) -> str:
    try:
        call()
    except ServerError as e:
        return e.code
    return "no error"


def main() -> int:
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["--workers", "1", "--shm-budget", "1G"], Path(tmp))
        with Client(server.address) as c:
            report["small_before"] = bool(np.array_equal(
                c.get("x", 1, "epix100", 1, "raw"), expected("epix100", "raw", 1)))
            report["v1_served"] = bool(np.array_equal(
                c.get("x", 1, "opal", 1, "calib"), expected("opal", "calib", 1)))
            report["after_v1"] = _segments()
            report["legacy_code"] = _code(lambda: legacy.fetch(
                parse_address(server.address), "x", 1, "idx", "opal", 1, "calib"))
            report["after_legacy"] = _segments()
            report["small_after"] = bool(np.array_equal(
                c.get("x", 1, "epix100", 2, "raw"), expected("epix100", "raw", 2)))
        report["exit_code"] = server.stop()
        report["at_end"] = sorted(os.listdir("/dev/shm"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
