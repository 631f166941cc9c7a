"""Run the code on the Python versions it promises, not only on the one
pytest uses: the server on 3.9 (psana environments); the client on 3.9 and
3.13 reading frames from the server's pool (descriptors through its door),
and attaching a legacy segment without Python's resource tracker — the
tracker would warn about "leaked" segments and unlink them when the client
exits, taking the server's memory with it."""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest

from psana_ipc.client import Client
from psana_ipc.protocol.address import parse_address
from psana_ipc.server.sources.synthetic import expected

from conftest import SHM

VERSIONS = ["3.9", "3.13"]


def find_python(version: str) -> Optional[str]:
    """An interpreter of that version that runs: on PATH, else under pyenv's root."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which(f"python{version}")] + \
        sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
            return exe
    return None


@pytest.fixture(scope="session")
def pythons(tmp_path_factory, project_wheel):
    """A virtual environment per version with this project's wheel and what it
    depends on (numpy; no torch), installed by this environment's pip (`--python`)
    instead of a pip of its own."""
    made = {}
    for version in VERSIONS:
        exe = find_python(version)
        if exe is None:
            pytest.skip(f"no python{version} on this machine")
        env = tmp_path_factory.mktemp(f"py{version}")
        subprocess.run([exe, "-m", "venv", "--without-pip", str(env)], check=True, timeout=300)
        made[version] = str(env / "bin" / "python")
        subprocess.run([sys.executable, "-m", "pip", "--python", made[version], "install", "-q",
                        "--disable-pip-version-check", str(project_wheel[0])],
                       check=True, timeout=600)
    return made


def test_server_runs_on_python39(start_server, pythons):
    server = start_server(["--workers", "2"], python=pythons["3.9"])
    with Client(server.address) as c:
        assert np.array_equal(c.get("x", 1, "jungfrau4M", 6, "calib"),
                              expected("jungfrau4M", "calib", 6))
        assert c.get_many("x", 1, "epix100", [1, 2], "raw").shape == (2, 704, 768)
    assert server.stop() == 0


ATTACH = """
import sys, numpy as np
from psana_ipc.client import Client
from psana_ipc.client.shm import attach
m = attach(sys.argv[1])
view = np.frombuffer(m, dtype=np.uint16, count=4)
print(int(view[1]))
del view
m.close()
with Client(sys.argv[2]) as c, c.view("x", 1, "epix100", 4, "raw") as frame:
    print(int(frame.array.flat[1]), c.server.transport)
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_a_client_reads_the_pool_and_attaches_a_segment_and_says_nothing(server, pythons,
                                                                         version):
    with socket.create_connection(parse_address(server.address)) as sock:   # a legacy frame
        sock.sendall(json.dumps({"exp": "x", "run": 1, "detector_name": "epix100",
                                 "event": 3, "mode": "raw"}).encode())
        name = json.loads(sock.recv(4096))["name"]
        result = subprocess.run([pythons[version], "-W", "error", "-c", ATTACH, name,
                                 server.address], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        segment, pool = result.stdout.splitlines()
        assert int(segment) == expected("epix100", "raw", 3).flat[1]
        assert pool == f"{expected('epix100', 'raw', 4).flat[1]} shm"
        assert result.stderr == ""                      # no resource_tracker warnings
        assert (SHM / name).exists()                    # not unlinked behind the server
        sock.sendall(b"ACK")
