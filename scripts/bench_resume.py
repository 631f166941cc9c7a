"""`scripts/bench.py --resume`: the time to a first batch, fresh, resumed
mid-epoch from a saved position, and read up to again."""
import argparse
import statistics
import time
from typing import Callable, Dict, Optional

from psana_ipc.client import BatchLoader, ResumableDataLoader, RunDataset

from bench_common import print_head, running_server  # this directory's module


def _close(loader) -> None:
    (loader.dataset if isinstance(loader, ResumableDataLoader) else loader).close()


def _first_batch_s(make: Callable[[], object], state: Optional[Dict] = None,
                   skip: int = 0) -> float:
    """Seconds from making a loader (as a restarted job does) to the batch it
    goes on with: after loading `state`, or after reading `skip` batches."""
    t0 = time.perf_counter()
    loader = make()
    if state is not None:
        loader.load_state_dict(state)
    batches = iter(loader)
    for _ in range(skip + 1):
        next(batches)
    elapsed = time.perf_counter() - t0
    del batches
    _close(loader)
    return elapsed


def _state_half_way(make: Callable[[], object], batches: int) -> Dict:
    loader = make()
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    del it
    _close(loader)
    return state


def run(args: argparse.Namespace) -> Dict:
    """Time to the first batch, fresh and resumed half-way, for BatchLoader and
    for RunDataset in a ResumableDataLoader with `--loader-workers` workers."""
    det, events = args.detectors[0], list(range(args.frames))
    half = args.frames // args.batch_size // 2
    result = {"detector": det, "cost_ms": args.cost_ms, "resumed_at_batch": half, "rows": {}}
    with running_server(args) as server:
        makers = {
            "BatchLoader": lambda: BatchLoader(server.address, "x", 1, det, "calib", events,
                                               batch_size=args.batch_size, shuffle=True),
            f"ResumableDataLoader, {args.loader_workers} workers": lambda: ResumableDataLoader(
                RunDataset(server.address, "x", 1, det, events=events), args.batch_size,
                shuffle=True, num_workers=args.loader_workers)}
        for name, make in makers.items():
            state = _state_half_way(make, half)
            _first_batch_s(make)                                      # warm-up
            row = {case: 1e3 * statistics.median(_first_batch_s(make, **kw)
                                                  for _ in range(args.repeats))
                   for case, kw in (("fresh_ms", {}), ("resumed_ms", {"state": state}),
                                    ("reread_ms", {"skip": half}))}
            result["rows"][name] = row
    return result


def print_table(result: Dict) -> None:
    print(f"time to the first batch, {result['detector']} calib, cost {result['cost_ms']} ms "
          f"per event, resumed at batch {result['resumed_at_batch']}")
    print_head("loader", "fresh ms", "resumed ms", "resumed ÷ fresh", "reading up to it again ms")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['fresh_ms']:.1f} | {r['resumed_ms']:.1f} | "
              f"{r['resumed_ms'] / r['fresh_ms']:.2f} | {r['reread_ms']:.1f} |")

