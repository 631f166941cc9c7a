"""`psana-ipc`: talk to a running iserver from the shell (ping, info, stats,
get, stop), remove what dead servers left in /dev/shm (cleanup), and write or
submit a SLURM job that runs a server beside a client command (slurm)."""
import argparse
import json
import sys
import time
from typing import List, Optional

import numpy as np

from psana_ipc.protocol.address import format_address
from psana_ipc.protocol.errors import ServerError
from psana_ipc.protocol.messages import MODES
from . import slurm, stop
from .cleanup import cleanup
from .connection import Client
from .discovery import ENV_ADDRESS, ENV_READY_FILE, resolve_address


def _client(args: argparse.Namespace) -> Client:
    return Client(args.address, timeout=args.timeout)


def cmd_ping(args: argparse.Namespace) -> int:
    with _client(args) as c:
        t0 = time.perf_counter()
        c.ping()
        print(f"pong from {format_address(c.address)} in {1e3 * (time.perf_counter() - t0):.1f} ms")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(c.info(args.exp, args.run, args.detector), indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(c.stats(), indent=2))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        frame, desc = c.get_frame(args.exp, args.run, args.detector, args.event, args.mode)
    print(f"{args.detector} event {args.event} {args.mode}: shape {frame.shape} {frame.dtype}, "
          f"min {frame.min()} max {frame.max()} mean {frame.mean():.3f}, "
          f"calibrated {desc.get('calibrated')}, timestamp {desc.get('timestamp')}")
    if args.out:
        np.save(args.out, frame)
        print(f"saved {args.out}")
    if args.png:
        from .preview import save_png
        save_png(frame, args.png, f"{args.exp} run {args.run} {args.detector} "
                                  f"event {args.event} ({args.mode})")
        print(f"saved {args.png}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    report = stop.stop_server(args.address, args.legacy, args.timeout, args.wait)
    print(report, file=sys.stdout if report.stopped else sys.stderr)
    return 0 if report.stopped else 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    print("\n".join(cleanup()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psana-ipc",
        description="Talk to a running iserver: check it, look at data, stop it, clean up.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None,
                        help=f"server as HOST:PORT or a UNIX socket path (default: "
                             f"${ENV_ADDRESS}, else the server named in ${ENV_READY_FILE}, "
                             f"else 127.0.0.1:5000)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", parents=[common], help="check that the server answers") \
        .set_defaults(func=cmd_ping)
    s = sub.add_parser("info", parents=[common], help="detectors of a run, or one detector's "
                                                      "events and per-mode shapes")
    s.add_argument("exp")
    s.add_argument("run", type=int)
    s.add_argument("detector", nargs="?")
    s.set_defaults(func=cmd_info)
    sub.add_parser("stats", parents=[common], help="events and bytes served, errors by code, "
                                                   "shared memory in use").set_defaults(func=cmd_stats)
    s = sub.add_parser("get", parents=[common], help="fetch one frame; print a summary, "
                                                     "optionally save it")
    s.add_argument("exp")
    s.add_argument("run", type=int)
    s.add_argument("detector")
    s.add_argument("event", type=int)
    s.add_argument("--mode", choices=MODES, default="calib")
    s.add_argument("--out", metavar="X.npy", help="save the frame with numpy.save")
    s.add_argument("--png", metavar="X.png", help="save a picture of the frame (needs matplotlib)")
    s.set_defaults(func=cmd_get)
    s = sub.add_parser("stop", parents=[common], help="shut the server down (all workers)")
    s.add_argument("--legacy", action="store_true", help="send the old DONE word")
    s.add_argument("--wait", type=float, default=30.0, help="seconds to wait until it is gone")
    s.set_defaults(func=cmd_stop)
    sub.add_parser("cleanup", help="remove shared memory left by servers that died") \
        .set_defaults(func=cmd_cleanup)
    slurm.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "address"):
        args.address = resolve_address(args.address)
    try:
        return args.func(args)
    except ServerError as e:
        print(f"psana-ipc: server error [{e.code}]: {e.message}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as e:
        print(f"psana-ipc: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
