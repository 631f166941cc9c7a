"""Separate hosts on one machine, for the tests and benchmarks that must cross
a real network interface (needs root and iproute2's `ip`).

Each host is a network namespace of its own, so it has its own loopback and
its own addresses. A process started on a host (`Hosts.command`) also gets
a UTS namespace with the host's name and a mount namespace with a private
/dev/shm: it shares neither loopback, host name nor shared memory with the
others, as a process on another node would. Hosts are joined pairwise by
veth pairs (`Hosts.link`) addressed 10.254.<link>.1/30 and .2/30; those
addresses exist only inside these namespaces, never on the machine's own
interfaces. `Hosts.close` kills what still runs on the hosts and deletes
the namespaces.

    with Hosts(["server", "client"]) as hosts:
        server_ip, client_ip = hosts.link("server", "client")
        subprocess.run(hosts.command("client", ["ping", "-c1", server_ip]))
"""
import itertools
import os
import signal
import subprocess
import time
from typing import Dict, List, Sequence, Tuple

_COUNT = itertools.count()
# Runs inside the namespace: name the host, give it its own /dev/shm, then run the command.
_ON_HOST = 'hostname "$0" && mount -t tmpfs -o size="$1",mode=1777 tmpfs /dev/shm && shift && ' \
           'exec "$@"'


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """Namespaces named `psipc<pid>x<n>-<host>`, so concurrent runs never meet."""

    def __init__(self, names: Sequence[str], shm_size: str = "2g") -> None:
        tag = f"psipc{os.getpid()}x{next(_COUNT)}"
        self.namespaces: Dict[str, str] = {}
        self.shm_size = shm_size
        self._links = 0
        try:
            for name in names:
                self.namespaces[name] = f"{tag}-{name}"
                ip("netns", "add", self.namespaces[name])
                ip("-n", self.namespaces[name], "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def link(self, a: str, b: str) -> Tuple[str, str]:
        """Join hosts `a` and `b` by a veth pair; their addresses on it."""
        self._links += 1
        k = self._links
        ends = ((a, f"to-{b}"[:15], f"10.254.{k}.1"), (b, f"to-{a}"[:15], f"10.254.{k}.2"))
        ip("link", "add", ends[0][1], "netns", self.namespaces[a], "type", "veth",
           "peer", "name", ends[1][1], "netns", self.namespaces[b])
        for host, device, address in ends:
            ip("-n", self.namespaces[host], "addr", "add", f"{address}/30", "dev", device)
            ip("-n", self.namespaces[host], "link", "set", device, "up")
        return ends[0][2], ends[1][2]

    def command(self, host: str, argv: Sequence[str]) -> List[str]:
        """`argv` as run on `host` (the last process of the chain is argv's own)."""
        return ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", _ON_HOST, host, self.shm_size,
                *argv]

    def pids(self, host: str) -> List[int]:
        """Processes running on a host."""
        found = subprocess.run(["ip", "netns", "pids", self.namespaces[host]],
                               capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    def close(self) -> None:
        """Kill what runs on the hosts, then delete their namespaces."""
        for host, namespace in self.namespaces.items():
            for _ in range(50):
                pids = self.pids(host)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        self.namespaces = {}

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
