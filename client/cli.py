"""`psana-ipc`: talk to a running iserver from the shell (ping, info, stats,
get, stop), remove what dead servers left in /dev/shm (cleanup), write or
submit a SLURM job that runs a server beside a client command (slurm), and
tell where a saved loader position stands (position).

Human output by default (tables, units, ISO times), `--json` for scripts.
Every mistake ends in one `psana-ipc: ...` line and an exit status:
0 done, 1 the server answered with an error, 2 bad command line (argparse's),
3 no server there (or the connection was lost), 4 a local problem (a
malformed address, a missing optional package, a file that cannot be written).
"""
import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

import psana_ipc
from psana_ipc.cli_help import HelpFormatter, epilog
from psana_ipc.protocol.address import format_address
from psana_ipc.protocol.errors import ServerError
from psana_ipc.protocol.messages import MODES
from . import cli_output, slurm, stop
from .cleanup import cleanup
from .client import Client
from .discovery import ENV_ADDRESS, ENV_READY_FILE, resolve_address
from .optional import require
from .position import StateError, where

EXIT_SERVER_ERROR = 1
EXIT_NO_SERVER = 3
EXIT_LOCAL = 4
EXIT_STATUSES = ("exit status: 0 done, 1 the server answered with an error, 2 bad command line,\n"
                 "3 no server there (or the connection was lost), 4 a local problem (malformed\n"
                 "address, missing optional package, file that cannot be written).")


class UserError(Exception):
    """A mistake the user can fix; the message says what to do."""


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
        info = c.info(args.exp, args.run, args.detector)
    print(json.dumps(info, indent=2) if args.json
          else cli_output.info_text(args.exp, args.run, args.detector, info))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        stats = c.stats()
    print(json.dumps(stats, indent=2) if args.json else cli_output.stats_text(stats))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if args.png:
        try:
            require("matplotlib", "plot", "--png")
        except ImportError as e:
            raise UserError(str(e)) from None
    for path in (args.out, args.png):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"cannot save {path}: its directory does not exist")
    with _client(args) as c:
        frame, desc = c.get_frame(args.exp, args.run, args.detector, args.event, args.mode)
    if args.json:
        print(json.dumps({"shape": list(frame.shape), "dtype": str(frame.dtype),
                          "min": frame.min().item(), "max": frame.max().item(),
                          "mean": float(frame.mean()), "calibrated": desc.get("calibrated"),
                          "timestamp": desc.get("timestamp")}))
    else:
        print(cli_output.frame_text(args.detector, args.event, args.mode, frame, desc))
    if args.out:
        np.save(args.out, frame)
        print(f"saved {args.out}", file=sys.stderr if args.json else sys.stdout)
    if args.png:
        from .preview import save_png
        save_png(frame, args.png, f"{args.exp} run {args.run} {args.detector} "
                                  f"event {args.event} ({args.mode})")
        print(f"saved {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    report = stop.stop_server(args.address, args.legacy, args.timeout, args.wait)
    print(report, file=sys.stdout if report.stopped else sys.stderr)
    return 0 if report.stopped else 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    print("\n".join(cleanup()))
    return 0


def cmd_position(args: argparse.Namespace) -> int:
    try:
        position = where(args.checkpoint)
    except OSError as e:
        raise UserError(f"cannot read {args.checkpoint}: {e.strerror}") from None
    except StateError as e:
        raise UserError(f"{args.checkpoint}: {e.message} [{e.code}]") from None
    print(json.dumps(position.to_state(), indent=2) if args.json else position.describe())
    return 0


def _command(sub: "argparse._SubParsersAction", name: str, parents: List[argparse.ArgumentParser],
             help: str, *examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=parents, help=help, description=help,
                          epilog=epilog(examples), formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psana-ipc",
        description="Talk to a running iserver: check it, look at data, stop it, clean up, "
                    "or run a client next to its own server in a SLURM job.",
        epilog=epilog(["psana-ipc ping",
                       "psana-ipc info xpptut15 14                 detectors of run 14",
                       "psana-ipc info xpptut15 14 epix10k2M       its events and frame shapes",
                       "psana-ipc get xpptut15 14 epix10k2M 42 --png f.png",
                       "psana-ipc stop --address unix:/tmp/me.sock"],
                      EXIT_STATUSES),
        formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {psana_ipc.__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None,
                        help=f"server as HOST:PORT or a UNIX socket path (default: "
                             f"${ENV_ADDRESS}, else the server named in ${ENV_READY_FILE}, "
                             f"else 127.0.0.1:5000)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true",
                         help="print JSON for scripts instead of a table")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("exp", help="experiment, e.g. xpptut15")
    run.add_argument("run", type=int, help="run number")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, "ping", [common], "check that the server answers",
             "psana-ipc ping --address 127.0.0.1:5001").set_defaults(func=cmd_ping)
    s = _command(sub, "info", [common, as_json, run],
                 "detectors of a run, or one detector's events and per-mode shapes",
                 "psana-ipc info xpptut15 14", "psana-ipc info xpptut15 14 epix10k2M --json")
    s.add_argument("detector", nargs="?", help="detector name (default: list the run's)")
    s.set_defaults(func=cmd_info)
    _command(sub, "stats", [common, as_json],
             "events and bytes served, errors by code, shared memory in use, frame cache "
             "hits, misses, read-ahead, evictions, bytes held",
             "psana-ipc stats", "psana-ipc stats --json | jq .shm_bytes") \
        .set_defaults(func=cmd_stats)
    s = _command(sub, "get", [common, as_json, run], "fetch one frame; print a summary, "
                                                     "optionally save it",
                 "psana-ipc get xpptut15 14 epix10k2M 42",
                 "psana-ipc get xpptut15 14 epix10k2M 42 --mode raw --out f.npy --png f.png")
    s.add_argument("detector", help="detector name (see `psana-ipc info EXP RUN`)")
    s.add_argument("event", type=int, help="event index in the run, from 0")
    s.add_argument("--mode", choices=MODES, default="calib", help="what to serve")
    s.add_argument("--out", metavar="X.npy", help="save the frame with numpy.save")
    s.add_argument("--png", metavar="X.png",
                   help="save a picture of the frame (needs psana-ipc[plot])")
    s.set_defaults(func=cmd_get)
    s = _command(sub, "stop", [common], "shut the server down (all workers)",
                 "psana-ipc stop", "psana-ipc stop --legacy --address 127.0.0.1:5000")
    s.add_argument("--legacy", action="store_true", help="send the old DONE word")
    s.add_argument("--wait", type=float, default=30.0, help="seconds to wait until it is gone")
    s.set_defaults(func=cmd_stop)
    _command(sub, "cleanup", [], "remove shared memory left by servers that died",
             "psana-ipc cleanup").set_defaults(func=cmd_cleanup)
    s = _command(sub, "position", [as_json], "where a saved loader position stands: epoch, "
                                             "events done, batches, ranks",
                 "psana-ipc position ckpt.json", "psana-ipc position model.pt --json")
    s.add_argument("checkpoint", help="a loader's state_dict() saved as JSON, or a checkpoint "
                                      "(JSON or torch.save) that holds one")
    s.set_defaults(func=cmd_position)
    slurm.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "address"):
            args.address = _address(args.address)
        return args.func(args)
    except ServerError as e:
        return _fail(f"server error [{e.code}]: {e.message}", EXIT_SERVER_ERROR)
    except UserError as e:
        return _fail(str(e), EXIT_LOCAL)
    except (ConnectionError, OSError) as e:
        return _fail(f"{e}; is the server running? (`psana-ipc ping` checks)", EXIT_NO_SERVER)


def _address(text: Optional[str]):
    try:
        return resolve_address(text)
    except OSError as e:
        raise ConnectionError(f"cannot read the ready file ${ENV_READY_FILE}="
                              f"{os.environ.get(ENV_READY_FILE)}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{e}; give HOST:PORT or a socket path") from None


def _fail(message: str, code: int) -> int:
    print(f"psana-ipc: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
