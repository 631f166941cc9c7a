"""What every mode of scripts/bench.py shares: its synthetic server, timed
passes with the CPU each side spends, the passes several modes time, and
table headers."""
import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
from torch.utils.data import DataLoader

from psana_ipc.client import BatchLoader, Client, IPCRemotePsanaDataset
from psana_ipc.client.server_process import ServerProcess, child_pids
from psana_ipc.server.sources.synthetic import expected

WARM_BATCHES = 3    # batches of events past the measured ones, read before a measured epoch


def cpu_seconds(pids: List[int]) -> float:
    """User + system CPU time of processes, from /proc (no psutil needed)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def live_children(server: int) -> Dict[int, float]:
    """CPU seconds of this process's live children other than the server
    (persistent DataLoader workers: os.times counts children once reaped)."""
    pids = set(child_pids(os.getpid()))
    pids.discard(server)
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_seconds([pid])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def client_cpu(server: int, since: Dict[int, float]) -> float:
    """This process's CPU, reaped children's, and live children's since `since`."""
    live = live_children(server)
    return sum(os.times()[:4]) + sum(t - since.get(pid, 0.0) for pid, t in live.items())


def measured_pass(run: Callable[[], int],
                  server: Optional[ServerProcess] = None) -> Dict[str, float]:
    """One pass: its frames and frames/s; with a server, also the CPU per
    frame of this process (DataLoader workers included) and of the server's
    workers."""
    if server is not None:
        children = live_children(server.pid)
        mine, theirs = client_cpu(server.pid, children), cpu_seconds(server.workers)
    t0 = time.perf_counter()
    frames = run()
    result = {"frames": frames, "fps": frames / (time.perf_counter() - t0)}
    if server is not None:
        result.update(client_ms=1e3 * (client_cpu(server.pid, children) - mine) / frames,
                      server_ms=1e3 * (cpu_seconds(server.workers) - theirs) / frames)
    return result


def timed(run: Callable[[], int], repeats: int,
          server: Optional[ServerProcess] = None) -> Dict[str, float]:
    """Median frames/s of `repeats` passes after one warm-up pass; with a
    server, also the CPU per frame over all of them (`measured_pass`)."""
    run()
    passes = [measured_pass(run, server) for _ in range(repeats)]
    result = {"fps": statistics.median(p["fps"] for p in passes)}
    if server is not None:
        frames = sum(p["frames"] for p in passes)
        result.update({cpu: sum(p[cpu] * p["frames"] for p in passes) / frames
                       for cpu in ("client_ms", "server_ms")})
    return result


@contextlib.contextmanager
def running_server(args: argparse.Namespace, *options: str) -> Iterator[ServerProcess]:
    """A synthetic server with `--cost-ms` and these options, stopped on leaving;
    its runs have the measured events and WARM_BATCHES batches more."""
    server = ServerProcess(["--workers", str(args.server_workers), "--log-level", "WARNING",
                            "--cost-ms", str(args.cost_ms),
                            "--cost-kind", args.cost_kind or "burn", "--synthetic-events",
                            str(args.frames + WARM_BATCHES * args.batch_size), *options])
    try:
        yield server
        with Client(server.address) as c:
            c.shutdown()
        server.proc.wait(30)
    finally:
        server.stop()


def epoch_fps(loader: Iterable, step_s: float = 0.0) -> float:
    """Frames/s of one pass, until its last batch arrived, sleeping `step_s`
    after each batch (a training step on a GPU): the step after the last
    batch overlaps nothing, and in a pass of ten batches would count a tenth
    of the pass as the loader's."""
    t0 = arrived = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch.shape[0]
        arrived = time.perf_counter()
        if step_s:
            time.sleep(step_s)
    return n / (arrived - t0)


def server_stats(address: str) -> Dict:
    with Client(address) as c:
        return c.stats()


def dataset_pass(address: str, det: str, events: List[int], protocol: str, workers: int,
                 batch: int, persistent: bool = False) -> Callable[[], int]:
    requests = [("bench", 1, "idx", det, e) for e in events]
    ds = IPCRemotePsanaDataset(address, requests, mode="calib", protocol=protocol)
    held = {"loader": DataLoader(ds, batch_size=batch, num_workers=workers,
                                 persistent_workers=persistent)}

    def run() -> int:
        return sum(b.shape[0] for b in held["loader"])

    def close() -> None:
        """What the path holds on the server goes before the next path: the
        loader (and so its persistent workers), then the dataset's connections."""
        held.clear()
        ds.close()
    run.close = close
    return run


def loader_pass(loader: BatchLoader, views: bool, owned: bool = False) -> Callable[[], int]:
    """Passes over a loader's batches (`views`: zero-copy); an `owned` loader
    closes with the pass (`run.close`)."""
    def run() -> int:
        if views:
            return sum(len(frames) for frames in loader.views())
        return sum(b.shape[0] for b in loader)
    if owned:
        run.close = loader.close
    return run


def server_paths(address: str, det: str, events: List[int], workers: int,
                 batch: int) -> Dict[str, Callable[[], Callable[[], int]]]:
    """Every path through a server by its row name, each made when asked for
    (a pass to time; its `close` gives back what it holds). They use only the
    client API every release has: `bench.py --against` runs them under
    another checkout's package too."""
    def loader(arenas: bool, views: bool) -> Callable[[], int]:
        return loader_pass(BatchLoader(address, "bench", 1, det, "calib", events, batch,
                                       arenas=arenas), views, owned=True)
    return {
        "legacy": lambda: dataset_pass(address, det, events, "legacy", workers, batch),
        "dataset-w0": lambda: dataset_pass(address, det, events, "v1", 0, batch),
        f"dataset-w{workers}": lambda: dataset_pass(address, det, events, "v1", workers, batch),
        f"dataset-w{workers}p": lambda: dataset_pass(address, det, events, "v1", workers, batch,
                                                     persistent=True),
        "batchloader": lambda: loader(arenas=False, views=False),
        "zero-copy": lambda: loader(arenas=False, views=True),
        "arena": lambda: loader(arenas=True, views=False),
    }


def memcpy_pass(det: str, n: int, batch: int) -> Callable[[], int]:
    sources = np.stack([expected(det, "calib", e) for e in range(16)])
    out = np.empty((batch,) + sources.shape[1:], sources.dtype)

    def run() -> int:
        for k in range(n):
            np.copyto(out[k % batch], sources[k % len(sources)])
        return n
    return run


def print_head(*columns: str) -> None:
    """A markdown table's header: the first column, `path` and `other` read as text, the
    rest as numbers (right-aligned)."""
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" if k == 0 or name in ("path", "other") else "---:"
                            for k, name in enumerate(columns)) + " |")

