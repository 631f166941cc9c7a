"""iserver fails at start-up with one line and a documented status, never a
traceback, and never touches a file it did not create (real subprocesses)."""
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from psana_ipc.client import Client

EXIT_USAGE, EXIT_STARTUP = 2, 3


def iserver(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "psana_ipc.server", "--port", "0", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line(result, status, *words):
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, result.stderr


def test_a_psana_source_without_psana_says_which_python_to_use():
    result = iserver("--source", "psana2")
    assert_one_line(result, EXIT_STARTUP, "iserver:", "psana", "psana environment's python")


def test_hdf5_without_h5py_names_the_extra():
    hide = "import sys; sys.modules['h5py'] = None; from psana_ipc.server.cli import main; "
    result = subprocess.run([sys.executable, "-c", hide + "sys.exit(main())", "--port", "0",
                             "--source", "hdf5"], capture_output=True, text=True, timeout=60)
    assert_one_line(result, EXIT_STARTUP, "h5py", "pip install 'psana-ipc[hdf5]'")


@pytest.mark.parametrize("option", ["--data-dir", "--calib-dir", "--hdf5-root"])
def test_a_missing_directory_is_refused(option, tmp_path):
    result = iserver(option, str(tmp_path / "missing"))
    assert_one_line(result, EXIT_STARTUP, option, "no such directory")


@pytest.mark.parametrize("budget", ["0", "10K"])
def test_a_budget_no_frame_fits_in_is_refused(budget):
    assert_one_line(iserver("--shm-budget", budget), EXIT_STARTUP, "--shm-budget", "frame")


@pytest.mark.parametrize("args, named", [
    (["--max-window", "0"], "--max-window"), (["--workers", "0"], "--workers"),
    (["--window", "0"], "--window"), (["--window", "65"], "--max-window"),
    (["--cache-size", "0"], "--open-sources"), (["--port", "99999"], "--port"),
    (["--ack-timeout", "nan"], "--ack-timeout"), (["--idle-timeout", "-1"], "--idle-timeout"),
    (["--request-timeout", "0"], "--request-timeout"), (["--cost-ms", "-5"], "--cost-ms"),
    (["--synthetic-events", "-1"], "--synthetic-events")])
def test_every_numeric_option_is_checked_before_start(args, named):
    assert_one_line(iserver(*args), EXIT_USAGE, named)


def test_the_ready_file_directory_is_checked_before_the_workers_start(tmp_path):
    result = iserver("--ready-file", str(tmp_path / "missing" / "r.json"))
    assert_one_line(result, EXIT_STARTUP, "--ready-file", "no such directory")
    assert "serving" not in result.stderr


def test_a_unix_socket_in_a_missing_directory_is_one_line(tmp_path):
    result = iserver("--unix", str(tmp_path / "missing" / "s.sock"))
    assert_one_line(result, EXIT_STARTUP, "cannot listen", "No such file")


def test_unix_never_replaces_a_regular_file(tmp_path):
    precious = tmp_path / "data.txt"
    precious.write_text("a user's data")
    result = iserver("--unix", str(precious))
    assert_one_line(result, EXIT_STARTUP, "not a socket", "untouched")
    assert precious.read_text() == "a user's data"


def test_unix_refuses_a_live_servers_socket(tmp_path):
    path = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(1)
        assert_one_line(iserver("--unix", path), EXIT_STARTUP, "in use")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.skipif(os.getuid() != 0, reason="planting a file of another user needs root")
def test_unix_refuses_a_socket_planted_by_another_user(tmp_path):
    path = str(tmp_path / "planted.sock")
    with socket.socket(socket.AF_UNIX) as planted:
        planted.bind(path)
    os.chown(path, 65534, 65534)
    assert_one_line(iserver("--unix", path), EXIT_STARTUP, "another user", "untouched")
    assert os.lstat(path).st_uid == 65534


def test_unix_takes_over_a_stale_socket(start_server, tmp_path):
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)   # bound, never listening: what a killed server leaves
    server = start_server(["--workers", "1", "--unix", path])
    with Client(server.address) as c:
        assert c.ping()


def test_the_ready_file_never_follows_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    ready = tmp_path / "ready.json"
    ready.symlink_to(victim)
    proc = subprocess.Popen([sys.executable, "-m", "psana_ipc.server", "--port", "0",
                             "--workers", "1", "--ready-file", str(ready)])
    try:
        deadline = time.monotonic() + 60
        while ready.is_symlink():   # replaced by the server's own file once it is ready
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert json.loads(ready.read_text())["pid"] == proc.pid
        assert stat.S_IMODE(os.lstat(ready).st_mode) == 0o600
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert victim.read_text() == "someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["victim.txt"]


def test_a_fifo_at_the_token_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    result = iserver("--token-file", str(fifo), timeout=30)
    assert_one_line(result, EXIT_STARTUP, "token file", "not a regular file")


def test_a_pool_larger_than_the_nodes_memory_is_refused():
    assert_one_line(iserver("--shm-budget", "100T"), EXIT_STARTUP, "100.0 TiB",
                    "more than this node's memory")


def test_the_start_up_line_names_source_address_workers_and_budget(start_server):
    server = start_server(["--workers", "2", "--shm-budget", "64M"])
    assert f"serving synthetic on {server.address}: 2 workers, shared-memory budget 64.0 MiB" \
        in server.log()
