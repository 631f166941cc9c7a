#!/usr/bin/env python
"""Across nodes: each figure beside a plain TCP stream of the same run.

Run by `scripts/bench.py --across-nodes` (as root: it makes network
namespaces with scripts/netns.py). Rows:

  wire speed    BatchLoader over inline from one server (no per-event cost)
                against a plain stream (`sendall` of frame-sized messages,
                `recv_into` one buffer, as many connections as server
                workers), on loopback and across a veth pair between two
                hosts; frames/s and the CPU each side spends per frame. Its
                workers write every frame (the source's work, which the
                stream does not do), or, from its frame cache (epochs after
                the first), only send it: the transport alone
  tls           the same plain stream across the veth pair through the
                standard library's ssl (a self-signed certificate made
                for the run; what TLS would cost the protocol at least)
  two servers   one loader fed by two servers on two hosts (`--server-workers`
                each) against one, when the per-event cost is waiting
                (`--cost-kind wait`, `--cost-ms`, 40 by default), beside
                the plain stream with as many connections; every frame
                compared with the source's formula; then one server killed
                mid-epoch

The client side of every row runs on its own host as this file's `stream`
or `loader` role, which prints one JSON line; the orchestrator starts the
servers and the stream's senders (`send` role) on theirs.
"""
import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from netns import Hosts  # noqa: E402  (this directory's module, also when run as a role)


def own_cpu() -> float:
    return sum(os.times()[:2])


# -- roles: what runs on a host ---------------------------------------------------------------
def role_send(args: argparse.Namespace) -> None:
    """Accept `--conns` connections on `--listen`, send each its share of
    `--frames` messages of `--nbytes`; print the port, then the CPU spent."""
    listener = socket.create_server((args.listen, 0))
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    payload = np.ones(args.nbytes, np.uint8)
    context = None
    if args.tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)

    def serve(count: int) -> None:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            conn = context.wrap_socket(conn, server_side=True)
        for _ in range(count):
            conn.sendall(payload)
        conn.close()
    threads = [threading.Thread(target=serve, args=(args.frames // args.conns,))
               for _ in range(args.conns)]
    start = own_cpu()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"cpu_s": own_cpu() - start}), flush=True)


def role_stream(args: argparse.Namespace) -> None:
    """Receive every message from the senders at `--addresses` (`--conns`
    connections each) into one buffer, one message per connection in turn."""
    context = None
    if args.tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    socks = []
    for address in args.addresses.split(","):
        host, port = address.rsplit(":", 1)
        for _ in range(args.conns):
            sock = socket.create_connection((host, int(port)))
            socks.append(context.wrap_socket(sock) if context is not None else sock)
    view = memoryview(bytearray(args.nbytes))
    per = args.frames // args.conns
    start, t0 = own_cpu(), time.perf_counter()
    for _ in range(per):
        for sock in socks:
            got = 0
            while got < args.nbytes:
                got += sock.recv_into(view[got:])
    seconds = time.perf_counter() - t0
    frames = per * len(socks)
    print(json.dumps({"fps": frames / seconds, "client_ms": 1e3 * (own_cpu() - start) / frames}))


def role_loader(args: argparse.Namespace) -> None:
    """One BatchLoader over `--addresses`: a first pass, then `--repeats`
    timed ones (median frames/s, CPU per frame over them). In the first
    pass, with `--check`, every frame is compared with the formula, and with
    `--kill`, that server's processes are killed after `--after` batches."""
    from psana_ipc.client import BatchLoader
    from psana_ipc.client.server_process import child_pids
    from psana_ipc.server.sources.synthetic import expected
    events = list(range(args.frames))
    loader = BatchLoader(args.addresses, "bench", 1, args.detector, "calib", events,
                         args.batch, transport=args.transport, output="numpy")
    result: Dict[str, Any] = {"frames": 0, "identical": 0, "checked": 0}
    rates, spent = [], 0.0
    for k in range(args.repeats + 1):
        start, t0, n = own_cpu(), time.perf_counter(), 0
        for b, batch in enumerate(loader):
            if args.check and not k:
                result["checked"] += len(batch)
                result["identical"] += sum(
                    np.array_equal(row, expected(args.detector, "calib", e))
                    for row, e in zip(batch, events[n:n + len(batch)]))
            n += len(batch)
            if args.kill and not k and b + 1 == args.after:
                for pid in child_pids(args.kill) + [args.kill]:
                    os.kill(pid, signal.SIGKILL)
        if k:
            rates.append(n / (time.perf_counter() - t0))
            spent += own_cpu() - start
            result["frames"] += n
    result.update(fps=statistics.median(rates), client_ms=1e3 * spent / result["frames"],
                  lost=[s.name for s in loader.group.servers if s.lost])
    loader.close()
    print(json.dumps(result))


ROLES = {"send": role_send, "stream": role_stream, "loader": role_loader}


# -- the orchestrator ---------------------------------------------------------------------------
class Run:
    """The hosts and options of one benchmark run."""

    def __init__(self, args: argparse.Namespace, hosts: Hosts, tmp: Path) -> None:
        from psana_ipc.server.sources.synthetic import expected
        self.args, self.hosts, self.tmp = args, hosts, tmp
        self.detector = args.detectors[0]
        self.nbytes = expected(self.detector, "calib", 0).nbytes
        self.conns = args.server_workers
        self.cache = str(int(1.1 * args.frames * (self.nbytes + 8192)) + (64 << 20))

    def role(self, host: Optional[str], name: str, *argv: str, wait: bool = True) -> Any:
        """This file's role `name` on `host` (None: here, on loopback)."""
        command = [sys.executable, __file__, name, *argv]
        command = self.hosts.command(host, command) if host else command
        if not wait:
            return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"{name} on {host or 'this host'} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stream(self, senders: Dict[Optional[str], str], client: Optional[str],
               tls: Sequence[str] = ()) -> Dict[str, float]:
        """The plain stream from senders (host: address to listen on) to
        `client`, `--conns` connections per sender: medians of `--repeats`."""
        passes = []
        frames = self.args.frames // len(senders)
        for _ in range(self.args.repeats):
            procs, addresses = [], []
            for host, listen in senders.items():
                proc = self.role(host, "send", "--listen", listen, "--conns", str(self.conns),
                                 "--frames", str(frames), "--nbytes", str(self.nbytes),
                                 *(["--tls", *tls] if tls else []), wait=False)
                port = json.loads(proc.stdout.readline())["port"]
                procs.append(proc)
                addresses.append(f"{listen}:{port}")
            got = self.role(client, "stream", "--addresses", ",".join(addresses), "--conns",
                            str(self.conns), "--frames", str(frames), "--nbytes",
                            str(self.nbytes), *(["--tls"] if tls else []))
            sent = sum(json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1])["cpu_s"]
                       for p in procs)
            got["server_ms"] = 1e3 * sent / (frames * len(senders))
            passes.append(got)
        return {k: statistics.median(p[k] for p in passes) for k in passes[0]}

    @contextlib.contextmanager
    def server(self, host: Optional[str], listen: str, *options: str) -> Iterator[Any]:
        from psana_ipc.client.server_process import ServerProcess
        ready = self.tmp / f"ready-{host}-{time.monotonic_ns()}.json"
        server = ServerProcess(["--workers", str(self.args.server_workers), "--host", listen,
                                "--log-level", "WARNING", "--synthetic-events",
                                str(self.args.frames), "--shm-budget", self.args.shm_budget,
                                *options], ready_file=ready, log_file=ready.with_suffix(".log"),
                               launcher=self.hosts.command(host, []) if host else ())
        try:
            yield server
        finally:
            server.stop()

    def loader(self, servers: List[Any], client: Optional[str], *argv: str,
               transport: str = "auto") -> Dict[str, Any]:
        """The loader role on `client` over these servers, with the CPU their
        workers spent per frame (warm-up pass included)."""
        from bench_common import cpu_seconds
        from psana_ipc.client.server_process import child_pids
        workers = [pid for s in servers for pid in child_pids(s.pid)]
        before = cpu_seconds(workers)
        got = self.role(client, "loader", "--addresses", ",".join(s.address for s in servers),
                        "--detector", self.detector, "--frames", str(self.args.frames),
                        "--batch", str(self.args.batch_size), "--repeats",
                        str(self.args.repeats), "--transport", transport, *argv)
        if "--kill" not in argv:
            got["server_ms"] = 1e3 * (cpu_seconds(workers) - before) \
                / (self.args.frames * (self.args.repeats + 1))
        return got


def _certificate(tmp: Path) -> List[str]:
    """A self-signed certificate and its key, for the TLS row only."""
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=psana-ipc-bench"], check=True,
                   capture_output=True)
    return [cert, key]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Every row (see the module docstring), as {"rows": [...], settings}."""
    cost_ms = args.cost_ms or 40.0
    wait = ["--cost-ms", str(cost_ms), "--cost-kind", args.cost_kind or "wait"]
    rows: List[Dict[str, Any]] = []

    def row(case: str, path: str, got: Dict[str, Any], stream: Dict[str, float]) -> None:
        rows.append(dict(got, case=case, path=path, of_stream=got["fps"] / stream["fps"]))

    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp_name, \
            Hosts(["a", "b", "client"], shm_size="16g") as hosts:
        tmp = Path(tmp_name)
        a_ip, _ = hosts.link("a", "client")
        b_ip, _ = hosts.link("b", "client")
        bench = Run(args, hosts, tmp)
        token = ["--token-file", str(tmp / "token")]
        os.environ["PSANA_IPC_TOKEN_FILE"] = str(tmp / "token")
        for case, host, client, listen in (("loopback", None, None, "127.0.0.1"),
                                           ("veth", "a", "client", a_ip)):
            stream = bench.stream({host: listen}, client)
            row(case, f"plain stream, {bench.conns} connections", stream, stream)
            with bench.server(host, listen, *token) as server:
                row(case, "BatchLoader inline, 1 server", bench.loader([server], client,
                                                                       transport="inline"),
                    stream)
            with bench.server(host, listen, *token, "--frame-cache", bench.cache) as server:
                bench.loader([server], client, transport="inline")     # fills the cache
                row(case, "the same, frames from its frame cache",
                    bench.loader([server], client, transport="inline"), stream)
            if host:
                row(case, "plain stream through ssl (TLS)",
                    bench.stream({host: listen}, client, _certificate(tmp)), stream)
        case = f"veth, {cost_ms:g} ms {args.cost_kind or 'wait'} per event"
        one_stream = bench.stream({"a": a_ip}, "client")
        two_stream = bench.stream({"a": a_ip, "b": b_ip}, "client")
        row(case, f"plain stream, {bench.conns} connections", one_stream, one_stream)
        row(case, f"plain stream, 2 x {bench.conns} connections", two_stream, two_stream)
        with bench.server("a", a_ip, *token, *wait) as a, \
                bench.server("b", b_ip, *token, *wait) as b:
            one = bench.loader([a], "client")
            row(case, "one loader, 1 server", one, one_stream)
            two = bench.loader([a, b], "client", "--check")
            two["x_one_server"] = two["fps"] / one["fps"]
            row(case, "one loader, 2 servers", two, two_stream)
            killed = bench.loader([a, b], "client", "--check", "--kill", str(b.pid))
            row(case, "the same, one server killed in the first epoch; later epochs",
                killed, one_stream)
    return {"rows": rows, "detector": bench.detector, "frame_mb": bench.nbytes / 1e6,
            "frames": args.frames, "batch": args.batch_size,
            "server_workers": args.server_workers, "cost_ms": cost_ms}


def print_table(result: Dict[str, Any]) -> None:
    print(f"{result['detector']} calib ({result['frame_mb']:.2f} MB frames), {result['frames']} "
          f"frames a pass, batches of {result['batch']}, {result['server_workers']} workers "
          f"per server")
    from bench_common import print_head
    print_head("case", "path", "frames/s", "of the plain stream", "client CPU ms/frame",
               "server CPU ms/frame", "other")
    for r in result["rows"]:
        other = []
        if "x_one_server" in r:
            other.append(f"{r['x_one_server']:.2f}x one server")
        if r.get("checked"):
            other.append(f"{r['identical']}/{r['checked']} frames identical")
        if r.get("lost"):
            other.append(f"left out: {', '.join(r['lost'])}")
        server = f"{r['server_ms']:.2f}" if "server_ms" in r else ""
        print(f"| {r['case']} | {r['path']} | {r['fps']:.1f} | {100 * r['of_stream']:.0f}% | "
              f"{r['client_ms']:.2f} | {server} | {', '.join(other)} |")


def main() -> int:
    """A role, run on a host by the orchestrator."""
    ap = argparse.ArgumentParser(description="a role of scripts/bench.py --across-nodes")
    ap.add_argument("role", choices=sorted(ROLES))
    ap.add_argument("--listen")
    ap.add_argument("--addresses")
    ap.add_argument("--conns", type=int, default=2)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--nbytes", type=int)
    ap.add_argument("--tls", nargs="*")
    ap.add_argument("--detector", default="epix10k2M")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transport", default="auto")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--kill", type=int)
    ap.add_argument("--after", type=int, default=2)
    args = ap.parse_args()
    ROLES[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
