"""The client of the preemption test's SLURM job: BatchLoader over a run, every
batch's events logged. On the job's first run it stops after --stop-after
batches, marks --ready and waits for the job's time-limit warning, then saves
the loader's position to --checkpoint and exits RESUME_EXIT; requeued, it
resumes from the checkpoint and finishes the epoch."""
import argparse
import json
import os
import sys
import time

from psana_ipc.client import BatchLoader, preemption
from psana_ipc.server.sources.synthetic import STEP


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("--checkpoint", "--log", "--ready"):
        ap.add_argument(name, required=True)
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--stop-after", type=int, required=True)
    args = ap.parse_args()
    stop = preemption.watch()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    loader = BatchLoader(None, "x", 1, "epix100", "raw", range(args.events), batch_size=2,
                         shuffle=True, seed=9, output="numpy")
    if os.path.exists(args.checkpoint):
        with open(args.checkpoint) as f:
            loader.load_state_dict(json.load(f))
    with open(args.log, "a") as log:
        for k, batch in enumerate(loader):
            log.write(json.dumps({"restart": restart,
                                  "events": [int(f.flat[0]) // STEP for f in batch]}) + "\n")
            log.flush()
            if restart == 0 and k + 1 == args.stop_after:
                open(args.ready, "w").close()
                while not stop.agreed():
                    time.sleep(0.1)
                with open(args.checkpoint, "w") as f:
                    json.dump(loader.state_dict(), f)
                return preemption.RESUME_EXIT
    loader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
