"""Who may read and stop a server: tokens, the legacy dialect's limits,
owner-only files, and what another user of the same node can reach."""
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from psana_ipc.client import Client, ServerError
from psana_ipc.client import legacy
from psana_ipc.client.wire import recv_message
from psana_ipc.protocol import errors
from psana_ipc.protocol.framing import encode_frame
from psana_ipc.server.context import is_local_peer
from psana_ipc.server.sources.synthetic import expected

from conftest import pid_alive, psana_ipc
from faulty_source.probes import closed_by_server, connect, hello

NOBODY = 65534


def _token_server(start, folder):
    path = folder / "token"
    server = start(["--workers", "1", "--token-file", str(path)])
    return server, path.read_text().strip()


@pytest.fixture
def token_server(start_server, tmp_path):
    """A server with a token file it created itself; returns (server, token)."""
    return _token_server(start_server, tmp_path)


@pytest.fixture(scope="module")
def shared_token_server(start_module_server, tmp_path_factory):
    """`token_server` for the tests that only connect to it."""
    return _token_server(start_module_server, tmp_path_factory.mktemp("token"))


def _served(client):
    return np.array_equal(client.get("x", 1, "epix100", 3, "raw"), expected("epix100", "raw", 3))


def test_the_token_file_is_made_owner_only_with_a_random_token(token_server, tmp_path):
    server, token = token_server
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    assert server.ready["token_file"] == str(tmp_path / "token")


@pytest.mark.parametrize("token", [None, "0" * 32, "é" * 8, ""])
def test_hello_without_the_right_token_is_refused_and_closed(shared_token_server, token):
    server, _ = shared_token_server
    with connect(server.address) as sock:
        reply = hello(sock, token=token)
        assert reply["ok"] is False and reply["code"] == errors.UNAUTHORIZED
        assert closed_by_server(sock)
    with pytest.raises(ServerError) as e:
        Client(server.address).ping()
    assert e.value.code == errors.UNAUTHORIZED


def test_connections_opened_together_close_those_not_welcomed_when_one_is_refused(
        shared_token_server):
    """A group opens its connections with their hellos in flight together: one
    refused leaves none half-open (a hello sent and its reply never read)."""
    server, token = shared_token_server
    first, refused, after = (Client(server.address, token=t) for t in (token, "0" * 32, token))
    with pytest.raises(ServerError) as e:
        Client.connect_all([first, refused, after])
    assert e.value.code == errors.UNAUTHORIZED
    assert [c.connected() for c in (first, refused, after)] == [True, False, False]
    assert first.ping() and after.ping()
    first.close()
    after.close()


@pytest.mark.parametrize("where", ["argument", "PSANA_IPC_TOKEN", "PSANA_IPC_TOKEN_FILE",
                                   "PSANA_IPC_READY_FILE"])
def test_the_right_token_from_each_place_the_client_looks(shared_token_server, monkeypatch,
                                                           where):
    server, token = shared_token_server
    for name in ("PSANA_IPC_ADDRESS", "PSANA_IPC_TOKEN", "PSANA_IPC_TOKEN_FILE",
                 "PSANA_IPC_READY_FILE"):
        monkeypatch.delenv(name, raising=False)
    kwargs = {"address": server.address}
    if where == "argument":
        kwargs["token"] = token
    elif where == "PSANA_IPC_TOKEN":
        monkeypatch.setenv(where, token)
    elif where == "PSANA_IPC_TOKEN_FILE":
        monkeypatch.setenv(where, server.ready["token_file"])
    else:       # the ready file names both the address and the token file
        monkeypatch.setenv(where, str(server.ready_file))
        kwargs = {}
    with Client(**kwargs) as c:
        assert c.ping() and _served(c)


def test_a_ready_file_token_goes_only_to_its_own_server(start_server, tmp_path, monkeypatch):
    """Two servers share a token; the ready file of one must not lend it to the other."""
    first = start_server(["--workers", "1", "--token-file", str(tmp_path / "token")])
    second = start_server(["--workers", "1", "--token-file", str(tmp_path / "token")])
    monkeypatch.delenv("PSANA_IPC_TOKEN", raising=False)
    monkeypatch.delenv("PSANA_IPC_TOKEN_FILE", raising=False)
    monkeypatch.setenv("PSANA_IPC_READY_FILE", str(first.ready_file))
    with Client(first.address) as c:
        assert c.ping()
    with pytest.raises(ServerError) as e:
        Client(second.address).ping()
    assert e.value.code == errors.UNAUTHORIZED


def test_the_cli_finds_server_and_token_in_the_ready_file(token_server):
    server, _ = token_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSANA_IPC_")}
    env["PSANA_IPC_READY_FILE"] = str(server.ready_file)

    stats = psana_ipc("stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["workers"] == 1
    stop = psana_ipc("stop", env=env)
    assert stop.returncode == 0, stop.stderr
    assert server.proc.wait(30) == 0


def test_shutdown_needs_the_token(token_server):
    server, token = token_server
    with connect(server.address) as sock:
        assert hello(sock, token=token)["ok"]
        sock.sendall(encode_frame({"op": "shutdown", "id": 1}))
        refused = recv_message(sock)[0]
        assert refused["ok"] is False and refused["code"] == errors.UNAUTHORIZED
        sock.sendall(encode_frame({"op": "shutdown", "id": 2, "token": "f" * 32}))
        assert recv_message(sock)[0]["code"] == errors.UNAUTHORIZED
        sock.sendall(encode_frame({"op": "ping", "id": 3}))
        assert recv_message(sock)[0]["pong"] is True
        sock.sendall(encode_frame({"op": "shutdown", "id": 4, "token": token}))
        assert recv_message(sock)[0] == {"ok": True, "id": 4, "stopping": True}
    assert server.proc.wait(30) == 0


@pytest.mark.parametrize("make", ["readable by others", "symlink", "empty"])
def test_a_token_file_others_could_read_or_plant_is_refused(tmp_path, make):
    path = tmp_path / "token"
    if make == "readable by others":
        path.write_text("a" * 32 + "\n")
        path.chmod(0o644)
    elif make == "symlink":
        (tmp_path / "elsewhere").write_text("a" * 32 + "\n")
        (tmp_path / "elsewhere").chmod(0o600)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.touch(0o600)
    proc = subprocess.run([sys.executable, "-m", "psana_ipc.server", "--port", "0",
                           "--workers", "1", "--token-file", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "token file" in proc.stderr


@pytest.mark.parametrize("flag", ["--no-legacy", "--token-file"])
def test_legacy_requests_and_done_are_refused_when_disabled(start_server, tmp_path, flag):
    """--no-legacy, and a token (the legacy dialect cannot carry one), shut the old
    dialect out: no frames, and DONE does not stop the server."""
    args = ["--no-legacy"] if flag == "--no-legacy" else ["--token-file", str(tmp_path / "t")]
    server = start_server(["--workers", "1"] + args)
    host, port = server.address.rsplit(":", 1)
    with pytest.raises(ServerError) as e:
        legacy.fetch((host, int(port)), "x", 1, "idx", "epix100", 3, "raw")
    assert e.value.code == errors.UNAUTHORIZED
    with connect(server.address) as sock:
        sock.sendall(b"DONE")
        assert json.loads(sock.recv(4096))["code"] == errors.UNAUTHORIZED
    token = (tmp_path / "t").read_text().strip() if flag == "--token-file" else None
    with Client(server.address, token=token) as c:
        assert _served(c)
    assert server.proc.poll() is None


def _non_loopback_address():
    """An IPv4 address of this machine outside 127/8, from the kernel's table."""
    table = Path("/proc/net/fib_trie").read_text()
    for address in re.findall(r"\|-- ([\d.]+)\n\s+/32 host LOCAL", table):
        if not address.startswith("127."):
            return address
    return None


def test_a_non_loopback_peer_gets_no_legacy_and_no_shared_memory(start_server):
    """Traffic from a non-loopback address of this machine: the server cannot tell it
    from another node's, so it treats it as remote. (A machine with only loopback
    skips this; test_is_local_peer_on_real_sockets still checks the rule itself.)"""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address outside 127/8")
    server = start_server(["--workers", "1", "--host", "0.0.0.0"])
    port = server.address.rsplit(":", 1)[1]
    assert "without --token-file" in server.log()
    request = json.dumps({"exp": "x", "run": 1, "access_mode": "idx",
                          "detector_name": "epix100", "event": 3, "mode": "raw"}).encode()
    with connect(f"{address}:{port}", source=address) as sock:
        sock.sendall(request)
        assert json.loads(sock.recv(4096))["code"] == errors.UNAUTHORIZED
    with connect(f"{address}:{port}", source=address) as sock:
        assert hello(sock, transport="shm")["transport"] == "inline"
        sock.sendall(encode_frame({"op": "get", "id": 1, "exp": "x", "run": 1,
                                   "detector": "epix100", "events": [3], "mode": "raw"}))
        header, payload = recv_message(sock)
        assert "name" not in header
        frame = np.frombuffer(payload, header["dtype"]).reshape(header["shape"])
        assert np.array_equal(frame, expected("epix100", "raw", 3))
    assert np.array_equal(legacy.fetch(("127.0.0.1", int(port)), "x", 1, "idx", "epix100", 3,
                                       "raw"), expected("epix100", "raw", 3))


def _as_another_user(probe):
    """Run `probe()` in a child that has become user nobody; returns its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = probe()
        except BaseException as e:
            result = {"probe failed": repr(e)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return json.loads(result)


def _errno_of(action):
    try:
        action()
        return 0
    except OSError as e:
        return e.errno


@pytest.fixture
def shared_dir():
    """A directory every user may enter (pytest's own temporary ones are private)."""
    path = Path(tempfile.mkdtemp(prefix="psana-ipc-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_another_user_reaches_neither_socket_nor_memory_nor_tokened_tcp(shared_dir,
                                                                        start_server, tmp_path):
    """Another user cannot connect to the UNIX socket, gets no descriptor of the
    pool at the door (closed on at once), and no hello on a tokened port."""
    shared = shared_dir
    unix = start_server(["--workers", "1", "--unix", str(shared / "iserver.sock")])
    tcp = start_server(["--workers", "1", "--token-file", str(tmp_path / "token")])
    with Client(unix.address) as c, c.view("x", 1, "epix100", 3, "raw"):
        door = c.server.door

        def probe():
            def unix_connect():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(shared / "iserver.sock"))

            def door_fds():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(f"\0{door}")
                    message, fds, _, _ = socket.recv_fds(s, 4096, 4)
                    return len(fds), len(message)

            def tcp_hello():
                with connect(tcp.address) as s:
                    return hello(s)["code"]
            return {"unix": _errno_of(unix_connect), "door": door_fds(), "tcp": tcp_hello()}
        result = _as_another_user(probe)
    assert result == {"unix": 13, "door": [0, 0], "tcp": errors.UNAUTHORIZED}   # 13: EACCES
    assert pid_alive(unix.pid) and pid_alive(tcp.pid)
    assert "door: refused process" in unix.log()


def test_is_local_peer_on_real_sockets():
    """The rule the server applies to every connection, without a server: UNIX and
    loopback peers are local; a peer that has already reset is not (and no error)."""
    a, b = socket.socketpair()
    with a, b:
        assert is_local_peer(a)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            assert is_local_peer(accepted)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            with pytest.raises(OSError):
                accepted.recv(1)
            assert not is_local_peer(accepted)
