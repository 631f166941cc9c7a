"""What both example jobs share: their data options and a DataLoader over this
rank's share of a run's events, served by the node's iserver, whose position
checkpoints (ResumableDataLoader)."""
import argparse
import json
from typing import Any, Dict, Tuple

from psana_ipc.client import IPCRemotePsanaDataset, ResumableDataLoader
from psana_ipc.client.distributed import rank_and_world


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exp", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--events", type=int, required=True, help="use events 0..N-1")
    parser.add_argument("--mode", default="calib", choices=["raw", "calib", "image"])
    parser.add_argument("--access-mode", default="idx")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader worker processes (each has its own connection)")
    parser.add_argument("--address", help="iserver address (default: $PSANA_IPC_ADDRESS, "
                                          "which the psana-ipc slurm job sets)")
    parser.add_argument("--summary", metavar="PATH",
                        help="write what this rank did as JSON; {rank} is replaced")


def rank_loader(args: argparse.Namespace) -> Tuple[ResumableDataLoader, Dict[str, Any]]:
    """A DataLoader over this rank's events (every world-th of the run's), and the
    start of its summary."""
    rank, world = rank_and_world()
    requests = [(args.exp, args.run, args.access_mode, args.detector, e)
                for e in range(args.events)]
    dataset = IPCRemotePsanaDataset(args.address, requests, mode=args.mode)
    loader = ResumableDataLoader(dataset, batch_size=args.batch_size, rank=rank,
                                 world_size=world, num_workers=args.loader_workers)
    events = [requests[i][4] for i in loader.sampler.indices()]
    return loader, {"rank": rank, "world": world, "events": events}


def write_summary(args: argparse.Namespace, summary: Dict[str, Any]) -> None:
    print(json.dumps(summary), flush=True)
    if args.summary:
        with open(args.summary.format(rank=summary["rank"]), "w") as f:
            json.dump(summary, f)
