"""Run inside a private /dev/shm (see probes.run_in_private_shm): a server
whose frame cache is larger than what another user left in /dev/shm.
Prints, as JSON, what was served, what the cache holds, the most /dev/shm
held and what was left behind.

The tmpfs is 64 MiB; a file of someone else's takes 40 MiB of it before the
server starts with `--frame-cache 48M`: the cache lives in the server's
pool, not in /dev/shm, so it takes none of what is left there. Three passes
over 30 epix100 raw frames (1.08 MB each, 32 MB in all), every frame
compared with the formula.
"""
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from psana_ipc.client import Client, ServerError
from psana_ipc.protocol.shm_names import SHM_DIR
from psana_ipc.server.sources.synthetic import expected

from conftest import ServerProcess, worker_pids
from faulty_source.probes import shm_used

DET, EVENTS, PASSES = "epix100", 30, 3
OTHERS = Path(SHM_DIR) / "someone-elses-data"


def main() -> int:
    OTHERS.write_bytes(os.urandom(1 << 20) * 40)
    digest = hashlib.sha256(OTHERS.read_bytes()).hexdigest()
    report = {"served": 0, "wrong": 0, "refused": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["--workers", "2", "--frame-cache", "48M",
                                "--shm-budget", "8M"], Path(tmp))
        workers = sorted(worker_pids(server.pid))
        peak = 0
        with Client(server.address) as c:
            for _ in range(PASSES):
                for e in range(EVENTS):
                    try:
                        same = np.array_equal(c.get("x", 1, DET, e, "raw"),
                                              expected(DET, "raw", e))
                    except ServerError as err:
                        report["refused"].append(err.code)
                        continue
                    report["served" if same else "wrong"] += 1
                    peak = max(peak, shm_used() - (40 << 20))
            stats = c.stats()
        report["shm_peak"] = peak
        report["cache"] = stats["frame_cache"]
        report["source_reads"] = stats["events"]
        report["same_workers"] = sorted(worker_pids(server.pid)) == workers
        report["exit_code"] = server.stop()
    report["others_intact"] = hashlib.sha256(OTHERS.read_bytes()).hexdigest() == digest
    OTHERS.unlink()
    report["left"] = sorted(os.listdir(SHM_DIR))
    report["at_end"] = shm_used()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
