"""What the namespace tests share: separate hosts on this machine
(scripts/netns.py), servers started on them, and a client process run on
one of them."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest

from psana_ipc.client.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
REMOTE_LOADER = Path(__file__).with_name("remote_loader.py")


def _netns() -> Any:
    spec = importlib.util.spec_from_file_location("netns", ROOT / "scripts" / "netns.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_hosts(names: Sequence[str]) -> Any:
    """Hosts (scripts/netns.py) for a test; it fails, naming why, where they
    cannot be made (namespaces need root and iproute2's `ip`)."""
    if os.geteuid() != 0:
        pytest.fail("the namespace tests make network namespaces and must run as root")
    try:
        return _netns().Hosts(names, shm_size="256m")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"cannot make network namespaces ({e}); scripts/setup_envs.sh installs "
                    f"iproute2")


def serve_on(hosts: Any, host: str, address: str, tmp: Path, *args: str) -> ServerProcess:
    """A synthetic server on `host`, listening on its `address`."""
    ready = tmp / f"ready-{host}.json"
    return ServerProcess(["--workers", "2", "--host", address, "--log-level", "WARNING", *args],
                         ready_file=ready, log_file=ready.with_suffix(".log"),
                         launcher=hosts.command(host, []))


def run_loader(hosts: Any, host: str, addresses: List[str], *args: str,
               env: Dict[str, str] = None) -> Dict[str, Any]:
    """tests/ops/remote_loader.py run on `host`: its JSON line."""
    done = subprocess.run(hosts.command(host, [sys.executable, str(REMOTE_LOADER),
                                               ",".join(addresses), *args]),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
