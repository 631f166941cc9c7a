"""A training process on another host, for the namespace tests: one
BatchLoader over the servers given, every frame checked against the
synthetic source's formula; optionally one server's processes killed after
some batches. Prints one JSON line: the transport the first connection
got, the frames and how many were identical, the servers left out, or the
error (its code, if the server sent one) that ended the run."""
import argparse
import json
import os
import signal

import numpy as np

from psana_ipc.client import BatchLoader, Client, ServerError
from psana_ipc.client.server_process import child_pids
from psana_ipc.server.sources.synthetic import expected


def kill(pid: int) -> None:
    """A server's master and workers, at once, as a node lost."""
    for one in child_pids(pid) + [pid]:
        os.kill(one, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("addresses")
    ap.add_argument("--detector", default="epix100")
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--kill", type=int, help="the pid of a server to kill mid-epoch")
    ap.add_argument("--after", type=int, default=2, help="batches before the kill")
    args = ap.parse_args()
    result = {"frames": 0, "identical": 0}
    try:
        with Client(args.addresses.split(",")[0]) as first:
            result["transport"] = first.connect().server.transport
        loader = BatchLoader(args.addresses, "exp", 1, args.detector, "calib",
                             range(args.events), args.batch, output="numpy")
        for k, batch in enumerate(loader):
            events = range(k * args.batch, k * args.batch + len(batch))
            result["frames"] += len(batch)
            result["identical"] += sum(np.array_equal(row, expected(args.detector, "calib", e))
                                       for row, e in zip(batch, events))
            if args.kill and k + 1 == args.after:
                kill(args.kill)
        result["lost"] = [s.name for s in loader.group.servers if s.lost]
        loader.close()
    except ServerError as e:
        result["error"] = e.code
    except ConnectionError as e:
        result["error"] = str(e)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
