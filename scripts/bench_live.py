#!/usr/bin/env python
"""Latency and lag of runs followed while the DAQ writes them.

Starts its own psana2 server and our writer (make_xtc2_run.py --live, the
psana environment's python) and follows each run with `Client.follow` from
before it begins. An event's latency is the time from the writer having
written it in every stream (its --times log) to the client holding its
array; its lag, the detector's events written after it by then.

  follow    epix10k2M over 2 streams at --rate Hz, --events events, followed
            in raw and in calib by two clients at once; every frame's digest
            is compared with psana's own read of the finished run
            (scripts/psana2_digests.py)
  fastest   epix10k2M raw, then a small detector (cspad), written as fast as
            the writer can (it reports the rate it sustains): latency, and
            the lag at each quarter of the run (bounded, not growing)
  latest    the small detector at --small-rate Hz, two consumers each taking
            twice the writer's interval per event: policy "every" (its lag
            grows) and "latest" (latency bounded, skips counted)

Prints a table; `--json` saves the figures. Needs both environments
(scripts/setup_envs.sh all) and about 4 GB of disk in --workdir:

    .venv/bin/python scripts/bench_live.py --json docs/bench_live.json
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from psana_ipc.client import Client
from psana_ipc.client.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from psana2_digests import digest  # noqa: E402

EXP = "tstx00117"
SMALL = ["--detectors", "cspad", "ebeam"]
EPIX = ["--detectors", "epix10k2M", "--panel-streams", "2"]
TIMEOUT = 30.0       # seconds a follow waits for a run to begin, or to grow again
STARTUP = 2.0        # seconds from a run's first event during which psana is set up


class Writer:
    """One run written live by make_xtc2_run.py in the psana environment."""

    def __init__(self, python: str, data: Path, run: int, events: int, rate: float,
                 options: List[str]) -> None:
        self.data, self.run = data, run
        self.times = data / f"times-r{run:04d}.txt"
        self.proc = subprocess.Popen([python, str(ROOT / "scripts" / "make_xtc2_run.py"),
                                      "--outdir", str(data), "--exp", EXP, "--run", str(run),
                                      "-n", str(events), "--live", str(rate),
                                      "--times", str(self.times), *options],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def finish(self) -> Dict[str, Any]:
        """The rate the writer sustained and when it wrote each event."""
        output, _ = self.proc.communicate()
        if self.proc.returncode:
            raise SystemExit(f"the writer failed:\n{output}")
        sustained = float(re.search(r"([\d.]+) Hz sustained", output).group(1))
        written = dict(tuple(map(float, line.split()))
                       for line in self.times.read_text().splitlines())
        return {"sustained_hz": sustained, "written": written}

    def remove(self) -> None:
        for path in list(self.data.glob(f"{EXP}-r{self.run:04d}-*")) + list(
                (self.data / "smalldata").glob(f"{EXP}-r{self.run:04d}-*")):
            path.unlink()


class Follow(threading.Thread):
    """A client following one detector of a run in a thread, noting when it
    held each event's array; `pace`: seconds of work per event; `digests`:
    keep a digest of each frame."""

    def __init__(self, address: Any, run: int, detector: str, mode: str, policy: str = "every",
                 pace: float = 0.0, digests: bool = False) -> None:
        super().__init__(daemon=True)
        self.address, self.run_number, self.detector, self.mode = address, run, detector, mode
        self.policy, self.pace, self.digests = policy, pace, digests
        self.got: List[Dict[str, Any]] = []
        self.reason = ""
        self.skipped = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            with Client(self.address) as c:
                follower = c.follow(EXP, self.run_number, self.detector, self.mode,
                                    policy=self.policy, timeout=TIMEOUT)
                for event in follower:
                    held = time.time()
                    self.got.append({"event": event.event, "held": held, "lag": event.lag,
                                     "digest": digest(event.frame) if self.digests else None})
                    if self.pace:
                        time.sleep(max(0.0, self.pace - (time.time() - held)))
                self.reason, self.skipped = follower.reason, follower.skipped
        except BaseException as e:      # reported by the main thread
            self.error = e


def figures(follow: Follow, written: Dict[float, float]) -> Dict[str, Any]:
    """Latency (median, p99, max; p99 also past the run's first STARTUP
    seconds, where a worker's first read of a detector sets psana up) and
    lag at each quarter of the run."""
    if follow.error is not None:
        raise follow.error
    events = [got["event"] for got in follow.got]
    latency = np.array([got["held"] - written[got["event"]] for got in follow.got])
    later = np.array([written[e] - written[0] >= STARTUP for e in events])
    lags = np.array([got["lag"] for got in follow.got])
    quarters = [float(np.mean(part)) for part in np.array_split(lags, 4)]
    return {"events": len(events), "in_order_once": events == sorted(set(events)),
            "latency_median_s": float(np.median(latency)),
            "latency_p99_s": float(np.percentile(latency, 99)),
            "latency_p99_after_startup_s": (float(np.percentile(latency[later], 99))
                                            if later.any() else None),   # a run that short
            "latency_max_s": float(latency.max()), "lag_max": int(lags.max()),
            "lag_mean_by_quarter": quarters, "skipped": follow.skipped, "ended": follow.reason}


def followed(address: Any, python: str, data: Path, calib: Path, run: int, events: int,
             rate: float, options: List[str], follows: List[Follow]) -> List[Dict[str, Any]]:
    """Start the follows, then the writer; the figures once all have ended,
    those of follows with digests compared with psana's read of the run."""
    for follow in follows:
        follow.start()
    writer = Writer(python, data, run, events, rate, options)
    wrote = writer.finish()
    for follow in follows:
        follow.join()
    found = [dict(figures(follow, wrote["written"]), writer_hz=wrote["sustained_hz"])
             for follow in follows]
    checked = [(follow, got) for follow, got in zip(follows, found) if follow.digests]
    if checked:
        calls = [f"{follow.detector}.{follow.mode}" for follow, _ in checked]
        reference = psana_digests(python, data, calib, run, calls)
        for (follow, got), call in zip(checked, calls):
            got["identical_to_psana"] = [event["digest"] for event in follow.got] == [
                line[call] for line in reference]
    writer.remove()
    return found


def psana_digests(python: str, data: Path, calib: Path, run: int,
                  calls: List[str]) -> List[Dict[str, Any]]:
    """psana's own read of the finished run, as digests (scripts/psana2_digests.py)."""
    done = subprocess.run([python, str(ROOT / "scripts" / "psana2_digests.py"), str(data),
                           str(calib), EXP, str(run), ",".join(calls)],
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--psana-python", default=str(ROOT / ".venv-psana" / "bin" / "python"))
    parser.add_argument("--workdir", type=Path, help="where runs are written (default: a "
                                                     "temporary directory)")
    parser.add_argument("--events", type=int, default=600, help="events of the followed run")
    parser.add_argument("--rate", type=float, default=10.0, help="its rate, Hz")
    parser.add_argument("--fast-events", type=int, default=300,
                        help="epix10k2M events written as fast as the writer can (0: none)")
    parser.add_argument("--small-events", type=int, default=10000,
                        help="small-detector events written as fast as the writer can (0: none)")
    parser.add_argument("--small-rate", type=float, default=120.0,
                        help="the small detector's rate for the half-rate consumers, Hz (0: "
                             "none)")
    parser.add_argument("--small-seconds", type=float, default=10.0,
                        help="how long the half-rate consumers' run lasts, s")
    parser.add_argument("--json", type=Path, help="save the figures here")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-live-"))
    data, calib = workdir / "xtc", workdir / "calib"
    (data / "smalldata").mkdir(parents=True, exist_ok=True)
    calib.mkdir(exist_ok=True)
    python = args.psana_python
    results: Dict[str, Any] = {}
    try:
        with ServerProcess(["--source", "psana2", "--workers", "2", "--offline",
                            "--data-dir", str(data), "--calib-dir", str(calib)],
                           python=python) as server:
            address = server.address
            raw, calib_ = followed(address, python, data, calib, 1, args.events, args.rate,
                                   EPIX + ["--calib-dir", str(calib)],
                                   [Follow(address, 1, "epix10k2M", mode, digests=True)
                                    for mode in ("raw", "calib")])
            results[f"follow {args.rate:g} Hz epix10k2M raw"] = raw
            results[f"follow {args.rate:g} Hz epix10k2M calib"] = calib_
            if args.fast_events:
                results["fastest epix10k2M raw"], = followed(
                    address, python, data, calib, 2, args.fast_events, 0, EPIX,
                    [Follow(address, 2, "epix10k2M", "raw")])
            if args.small_events:
                results["fastest cspad raw"], = followed(
                    address, python, data, calib, 3, args.small_events, 0, SMALL,
                    [Follow(address, 3, "cspad", "raw")])
            if args.small_rate:
                pace = 2 / args.small_rate
                every, latest = followed(
                    address, python, data, calib, 4, int(args.small_seconds * args.small_rate),
                    args.small_rate, SMALL,
                    [Follow(address, 4, "cspad", "raw", policy, pace) for policy in
                     ("every", "latest")])
                results[f"half-rate consumer, every ({args.small_rate:g} Hz)"] = every
                results[f"half-rate consumer, latest ({args.small_rate:g} Hz)"] = latest
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} cores (work of others on a shared machine shows here)")
    if args.json:
        args.json.write_text(json.dumps(dict(results, load_average=load), indent=1) + "\n")
    return 0


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(results: Dict[str, Any]) -> None:
    print(f"{'':44} {'writer':>7} {'events':>6} {'latency s':>23} {'lag':>5} "
          f"{'lag by quarter':>22} {'skipped':>7}")
    print(f"{'':44} {'Hz':>7} {'':>6} {'median':>7} {'p99':>7} {'p99 2s+':>7} {'max':>5}")
    for name, found in results.items():
        quarters = " ".join(f"{q:.1f}" for q in found["lag_mean_by_quarter"])
        print(f"{name:44} {found['writer_hz']:7.1f} {found['events']:6d} "
              f"{found['latency_median_s']:7.3f} {found['latency_p99_s']:7.3f} "
              f"{_seconds(found['latency_p99_after_startup_s']):>7} "
              f"{found['lag_max']:5d} {quarters:>22} {found['skipped']:7d}")
    for name, found in results.items():
        checks = [f"in order, once: {found['in_order_once']}"]
        if "identical_to_psana" in found:
            checks.append(f"identical to psana's read of the finished run: "
                          f"{found['identical_to_psana']}")
        print(f"{name}: {'; '.join(checks)}; {found['ended']}")


if __name__ == "__main__":
    sys.exit(main())
