"""`scripts/bench.py --against CHECKOUT`: this checkout against another (an
earlier release's), path by path. Each side has a server of its own and a
process that keeps one path open, and their passes are taken in turn (ABBA),
so that whatever the machine does meanwhile falls on both alike: on a shared
VM, memory bandwidth drifts by tens of percent over minutes, which separate
runs of bench.py would compare as if it were the code. Each side starts
first for half of the pairs: run against itself, a checkout whose side
always started first was the faster in 77 of 192 pairs, and in 95 of 192
with the order swapped.

Each side runs this file under its own python (`python bench_against.py
SPEC`: one timed pass for every line "pass" on stdin, answered with a JSON
line), with the paths of this checkout's bench_common.py, which use only the
client API every release has.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, List, Tuple

from psana_ipc.client.server_process import ServerProcess

from bench_common import measured_pass, print_head, server_paths  # this directory's module

HERE = Path(__file__).resolve()
WARM_PASSES = 2


def serve_passes(spec: Dict[str, Any]) -> None:
    """One side: its own server and one path, a pass per "pass" line on stdin
    (the server started with the options every release has: no --cost-kind)."""
    server = ServerProcess(["--workers", str(spec["server_workers"]), "--log-level", "WARNING",
                            "--cost-ms", str(spec["cost_ms"]), "--synthetic-events",
                            str(spec["frames"]), "--shm-budget", spec["shm_budget"]])
    try:
        run = server_paths(server.address, spec["detector"], list(range(spec["frames"])),
                           spec["loader_workers"], spec["batch_size"])[spec["path"]]()
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "pass":
                break
            print(json.dumps(measured_pass(run, server)), flush=True)
        getattr(run, "close", lambda: None)()
    finally:
        server.stop()


class _Side:
    """A side's pass process, started in its checkout with its python."""

    def __init__(self, python: str, checkout: str, spec: Dict[str, Any]) -> None:
        self.errors: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([python, str(HERE), json.dumps(spec)], cwd=checkout,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True)
        self._answer()

    def one(self) -> Dict[str, float]:
        self.proc.stdin.write("pass\n")
        self.proc.stdin.flush()
        return json.loads(self._answer())

    def _answer(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise RuntimeError(f"{self.proc.args[0]} failed:\n{self.errors.read()[-3000:]}")
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
            self.proc.wait(120)
        self.errors.close()


def _pairs(sides: Dict[str, Tuple[str, str]], first: str, spec: Dict[str, Any], count: int,
           passes: Dict[str, List[Dict]]) -> None:
    """`count` pairs of passes (ABBA) of sides started with `first` first,
    after WARM_PASSES each, added to `passes`."""
    order = [first] + [name for name in sides if name != first]
    started = {name: _Side(*sides[name], spec) for name in order}
    try:
        for _ in range(WARM_PASSES):
            for side in started.values():
                side.one()
        for k in range(count):
            for name in (("this", "other") if k % 2 else ("other", "this")):
                passes[name].append(started[name].one())
    finally:
        for side in started.values():
            side.close()


def _row(path: str, det: str, this: List[Dict], other: List[Dict]) -> Dict[str, Any]:
    ratios = [a["fps"] / b["fps"] for a, b in zip(this, other)]
    med = statistics.median
    return {"path": path, "detector": det, "pairs": len(ratios),
            "this_fps": med(p["fps"] for p in this), "other_fps": med(p["fps"] for p in other),
            "ratio": med(ratios), "this_faster": sum(r >= 1 for r in ratios),
            "lowest": min(ratios), "highest": max(ratios),
            "passes_fps": {"this": [p["fps"] for p in this], "other": [p["fps"] for p in other]},
            **{f"{side}_{cpu}": med(p[cpu] for p in passes)
               for side, passes in (("this", this), ("other", other))
               for cpu in ("server_ms", "client_ms")}}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    python = args.against_python or os.path.join(args.against, ".venv", "bin", "python")
    if not os.path.isdir(args.against) or not os.access(python, os.X_OK):
        raise SystemExit(f"bench.py: --against needs a checkout and its python; {python} is "
                         f"not there (build it with the checkout's scripts/test.sh, or give "
                         f"--against-python)")
    sides = {"this": (sys.executable, str(HERE.parent.parent)), "other": (python, args.against)}
    known = list(server_paths("", "", [], args.loader_workers, 1))     # made only when asked
    unknown = sorted(set(args.paths or ()) - set(known))
    if unknown:
        raise SystemExit(f"bench.py: no path {', '.join(unknown)} to compare; the paths are "
                         f"{', '.join(known)}")
    rows = []
    for det in args.detectors:
        for path in args.paths or known:
            spec = {"detector": det, "path": path, "frames": args.frames,
                    "batch_size": args.batch_size, "server_workers": args.server_workers,
                    "loader_workers": args.loader_workers, "cost_ms": args.cost_ms,
                    "shm_budget": args.shm_budget}
            passes: Dict[str, List[Dict]] = {"this": [], "other": []}
            half = args.pairs // 2
            for first, count in (("this", half), ("other", args.pairs - half)):
                _pairs(sides, first, spec, count, passes)
            rows.append(_row(path, det, passes["this"], passes["other"]))
            print(f"  {det} {path}: {rows[-1]['ratio']:.2f}", file=sys.stderr)
    return {"against": args.against, "frames": args.frames, "pairs": args.pairs, "rows": rows}


def print_table(result: Dict[str, Any]) -> None:
    print(f"this checkout against {result['against']}, {result['pairs']} pairs of passes of "
          f"{result['frames']} frames (ratio: median of this/other per pair)\n")
    print_head("path", "detector", "other frames/s", "this frames/s", "ratio", "this faster",
               "lowest", "highest", "server ms other", "this", "client ms other", "this")
    for r in result["rows"]:
        print(f"| {r['path']} | {r['detector']} | {r['other_fps']:.0f} | {r['this_fps']:.0f} | "
              f"{r['ratio']:.3f} | {r['this_faster']}/{r['pairs']} | {r['lowest']:.2f} | "
              f"{r['highest']:.2f} | {r['other_server_ms']:.2f} | {r['this_server_ms']:.2f} | "
              f"{r['other_client_ms']:.3f} | {r['this_client_ms']:.3f} |")


if __name__ == "__main__":
    serve_passes(json.loads(sys.argv[1]))
