"""One rank of the preemption tests' torch.distributed (gloo) job: RunDataset in
a DataLoader with workers, its batches taken in lockstep with the other
ranks, every batch's events logged. It resumes from --checkpoint when that
file exists; with --save-after K rank 0 writes the loader's state there once
every rank has taken K steps; with --hold-after H each rank marks that it
has taken H steps and waits to be killed."""
import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from lockstep import event_of
from psana_ipc.client import ElasticSampler, ResumableDataLoader, RunDataset

EPOCH = 1
SEED = 3


def make_loader(kind: str, dataset: RunDataset, workers: int):
    if kind == "resumable":
        return ResumableDataLoader(dataset, batch_size=2, shuffle=True, seed=SEED,
                                   num_workers=workers)
    sampler = ElasticSampler(dataset, shuffle=True, seed=SEED, batch_size=2)
    return StatefulDataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers)


def save(state: dict, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.rename(path + ".tmp", path)


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("--address", "--rendezvous", "--log", "--checkpoint", "--loader"):
        ap.add_argument(name, required=True)
    for name in ("--rank", "--world", "--workers"):
        ap.add_argument(name, type=int, required=True)
    ap.add_argument("--save-after", type=int)
    ap.add_argument("--hold-after", type=int)
    args = ap.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{args.rendezvous}", rank=args.rank,
                            world_size=args.world)
    dataset = RunDataset(args.address, "x", 1, "epix100", mode="raw")
    loader = make_loader(args.loader, dataset, args.workers)
    if os.path.exists(args.checkpoint):
        with open(args.checkpoint) as f:
            loader.load_state_dict(json.load(f))
    (loader.sampler if args.loader == "stateful" else loader).set_epoch(EPOCH)
    batches = iter(loader)
    step = 0
    with open(args.log, "w") as log:
        while True:
            batch = next(batches, None)
            more = torch.tensor([batch is not None], dtype=torch.int64)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)      # DDP's lockstep, uneven ends
            if not more.item():
                break
            if batch is not None:
                log.write(json.dumps({"step": step, "rank": args.rank,
                                      "events": [event_of(f) for f in batch]}) + "\n")
                log.flush()
            step += 1
            if step == args.save_after:
                dist.barrier()
                if args.rank == 0:
                    save(loader.state_dict(), args.checkpoint)
                dist.barrier()
            if step == args.hold_after:
                open(args.log + ".held", "w").close()
                signal.pause()
    dist.destroy_process_group()
    dataset.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
