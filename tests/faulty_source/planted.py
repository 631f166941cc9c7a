"""Run inside a private /dev/shm owned by another user with the sticky bit
(see probes.run_in_private_shm), as root without CAP_FOWNER: files of a
third uid there cannot be removed (EPERM), as on a shared node. 48 names
shaped like the server's are planted by "someone else" (segments, and
batch arenas and cache blocks as they once were named); prints, as JSON,
what the server served past them and what `psana-ipc cleanup` did about
them."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from psana_ipc.client import Client, legacy
from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol.shm_names import lock_name, segment_name, segment_path
from psana_ipc.server.sources.synthetic import expected

from conftest import ServerProcess, worker_pids

OTHER_UID = 4343


def plant(name: str) -> str:
    path = segment_path(name)
    Path(path).write_bytes(b"not yours")
    os.chown(path, OTHER_UID, OTHER_UID)
    return name


def served(client: Client, event: int) -> bool:
    return bool(np.array_equal(client.get("x", 1, "epix100", event, "raw"),
                               expected("epix100", "raw", event)))


def served_legacy(server: ServerProcess, event: int) -> bool:
    got = legacy.fetch(parse_address(server.address), "x", 1, "idx", "epix100", event, "raw")
    return bool(np.array_equal(got, expected("epix100", "raw", event)))


def main() -> int:
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        python = Path(tmp) / "python-without-fowner"
        python.write_text(f"#!/bin/sh\nexec setpriv --bounding-set -fowner --inh-caps -fowner "
                          f"-- {sys.executable} \"$@\"\n")
        python.chmod(0o755)
        server = ServerProcess(["--workers", "1"], Path(tmp), python=str(python))
        [worker] = worker_pids(server.pid)
        shapes = ([format(n, "x") for n in range(16)]                  # serials of segments
                  + [f"a{n:012x}x{n:x}" for n in range(16)]            # batch arenas', as once
                  + [f"c{n:x}" for n in range(16)])                    # cache blocks', as once
        planted = [plant(segment_name(server.pid, worker, serial)) for serial in shapes]
        with Client(server.address) as c:
            made = [c.make_arena(256 << 10) for _ in range(3)]
            report["served_past_planted_names"] = (len(made) == 3
                                                   and all(served(c, e) for e in range(6))
                                                   and all(served_legacy(server, e)
                                                           for e in range(6)))
        planted.append(plant(segment_name(server.pid, worker, "zz")))
        os.kill(worker, signal.SIGKILL)          # the master sweeps the dead worker's names
        deadline = time.monotonic() + 30
        while len(worker_pids(server.pid)) != 1 or worker in worker_pids(server.pid):
            if time.monotonic() > deadline or server.proc.poll() is not None:
                break
            time.sleep(0.05)
        report["master_alive_after_sweep"] = server.proc.poll() is None
        with Client(server.address) as c:
            report["served_after_sweep"] = served(c, 2)
        report["exit_code"] = server.stop()
        report["log"] = server.log()
        report["planted_untouched"] = all(os.path.exists(segment_path(n)) for n in planted)
        dead = 999999                            # a server pid that cannot exist
        foreign = [plant(segment_name(dead, 1, "0")), plant(lock_name(dead + 1)),
                   plant(segment_name(dead + 1, 1, "0"))]
        cleanup = subprocess.run([str(python), "-m", "psana_ipc.client.cli", "cleanup"],
                                 capture_output=True, text=True, timeout=60)
        report["cleanup_rc"] = cleanup.returncode
        report["cleanup_out"] = cleanup.stdout + cleanup.stderr
        report["foreign_untouched"] = all(os.path.exists(segment_path(n)) for n in foreign)
        for name in planted + foreign:
            os.unlink(segment_path(name))
        report["at_end"] = sorted(os.listdir("/dev/shm"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
