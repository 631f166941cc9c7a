"""What a scientist meets first: both CLIs' messages, exit statuses, help and
output, and the client library's torch-like manners (real subprocesses and
servers)."""
import gc
import json
import os
import subprocess
import sys
import warnings

import pytest

import psana_ipc
from psana_ipc.client import BatchLoader, Client, IPCRemotePsanaDataset, RunDataset
from psana_ipc.client.server_process import ServerProcess, ServerStartError

from psana2_helpers import psana_python

EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_NO_SERVER, EXIT_LOCAL = 1, 2, 3, 4


def psana_ipc_cli(*args, env=None, missing=None):
    """`psana-ipc ARGS`; `missing`: a package made unimportable, as if not installed."""
    hide = f"import sys; sys.modules[{missing!r}] = None; " if missing else ""
    code = hide + "import sys; from psana_ipc.client.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def assert_one_line(result, status, *words):
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psana-ipc: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


# -- mistakes: one line, a documented status --------------------------------------------
@pytest.mark.parametrize("address", ["foo", "nohost:abc", "localhost:99999"])
def test_a_malformed_address_is_one_line(address):
    assert_one_line(psana_ipc_cli("ping", "--address", address), EXIT_LOCAL, address)


def test_a_missing_ready_file_is_one_line(tmp_path):
    result = psana_ipc_cli("ping", env={"PSANA_IPC_READY_FILE": str(tmp_path / "missing")})
    assert_one_line(result, EXIT_NO_SERVER, "ready file", "missing", "server running")


def test_no_server_is_one_line():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, not listening: nobody answers
        assert_one_line(psana_ipc_cli("ping", "--address", f"127.0.0.1:{port}"),
                        EXIT_NO_SERVER, "cannot connect")


def test_a_server_error_keeps_its_code_and_not_argparses_status(shared_server):
    result = psana_ipc_cli("get", "x", "1", "nope", "5", "--address", shared_server.address)
    assert_one_line(result, EXIT_SERVER_ERROR, "unknown_detector")


def test_png_without_matplotlib_names_the_extra_before_any_work(shared_server, tmp_path):
    result = psana_ipc_cli("get", "x", "1", "epix100", "5", "--png", str(tmp_path / "f.png"),
                           "--address", shared_server.address, missing="matplotlib")
    assert_one_line(result, EXIT_LOCAL, "matplotlib", "psana-ipc[plot]")
    assert result.stdout == ""


def test_the_dataset_without_torch_names_the_extra():
    done = subprocess.run([psana_python(), "-c",
                           "from psana_ipc.client import IPCRemotePsanaDataset"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: IPCRemotePsanaDataset needs torch: pip install 'psana-ipc[torch]' "
        "(with the torch build your node needs installed first, e.g. from pytorch.org)")


# -- output for people and for scripts ------------------------------------------------------
def test_info_is_a_table_by_default_and_json_on_request(shared_server):
    human = psana_ipc_cli("info", "x", "1", "epix10k2M", "--address", shared_server.address)
    assert human.returncode == 0, human.stderr
    assert "16×352×384" in human.stdout and "MiB" in human.stdout
    raw = [line.split() for line in human.stdout.splitlines() if line.startswith("raw ")]
    assert raw == [["raw", "16×352×384", "uint16", "4.1", "MiB", "n/a"]], human.stdout
    machine = psana_ipc_cli("info", "x", "1", "epix10k2M", "--json",
                            "--address", shared_server.address)
    assert json.loads(machine.stdout)["modes"]["raw"]["shape"] == [16, 352, 384]


def test_stats_and_get_speak_units_and_iso_times(shared_server):
    stats = psana_ipc_cli("stats", "--address", shared_server.address)
    assert "shm budget" in stats.stdout and "iB" in stats.stdout, stats.stdout
    got = psana_ipc_cli("get", "x", "1", "epix100", "3", "--address", shared_server.address)
    assert got.returncode == 0, got.stderr
    assert "704×768 float32" in got.stdout and "2023-11-14T22:13:20.003000000Z" in got.stdout


def test_versions_agree():
    for command in ("psana_ipc.server", "psana_ipc.client.cli"):
        out = subprocess.run([sys.executable, "-m", command, "--version"], capture_output=True,
                             text=True, timeout=60).stdout
        assert out.split()[-1] == psana_ipc.__version__
    assert psana_ipc.__version__.count(".") == 2


def test_help_shows_defaults_examples_and_every_positional():
    top = psana_ipc_cli("--help").stdout
    assert "examples:" in top and "exit status" in top
    info = psana_ipc_cli("info", "--help").stdout
    assert "experiment" in info and "run number" in info and "examples:" in info
    server_help = subprocess.run([sys.executable, "-m", "psana_ipc.server", "--help"],
                                 capture_output=True, text=True, timeout=60).stdout
    assert "(default: 5)" in server_help and "exit status" in server_help


def test_log_level_in_any_case_and_stop_logs_a_shutdown_request(start_server):
    server = start_server(["--workers", "1", "--log-level", "info"])
    assert "serving synthetic on " in server.log() and "1 workers" in server.log()
    assert "shared-memory budget" in server.log()
    assert psana_ipc_cli("stop", "--address", server.address).returncode == 0
    assert server.proc.wait(30) == 0
    assert "shutdown requested by a client" in server.log()
    assert "SIGTERM" not in server.log()


# -- the start-a-server helper -------------------------------------------------------------
def test_server_process_starts_and_stops_a_server():
    with ServerProcess(["--workers", "1"]) as server:
        with Client(server.address) as c:
            assert c.ping()
    assert server.proc.returncode == 0 and not server.ready_file.exists()


def test_server_process_reports_a_server_that_cannot_start(tmp_path):
    with pytest.raises(ServerStartError, match="status 3"):
        ServerProcess(["--shm-budget", "1K"], log_file=tmp_path / "log")
    assert "--shm-budget" in (tmp_path / "log").read_text()


# -- the library looks like torch -----------------------------------------------------------
def test_batch_loader_needs_the_run_and_detector():
    with pytest.raises(TypeError):
        BatchLoader("127.0.0.1:5000")


def test_a_mode_typo_fails_at_construction(shared_server):
    with pytest.raises(ValueError, match="calbi"):
        IPCRemotePsanaDataset(shared_server.address, [("x", 1, "idx", "epix100", 0)], mode="calbi")
    with pytest.raises(ValueError, match="calbi"):
        RunDataset(shared_server.address, "x", 1, "epix100", mode="calbi")


def test_a_dropped_dataset_closes_without_a_resource_warning(shared_server):
    ds = RunDataset(shared_server.address, "x", 1, "epix100", events=range(2))
    assert ds[0].shape == (704, 768)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del ds
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_batch_loader_shows_progress(shared_server, capsys):
    loader = BatchLoader(shared_server.address, "x", 1, "epix100", "raw", range(6), batch_size=2,
                         output="numpy", progress=True)
    assert sum(len(b) for b in loader) == 6
    loader.close()
    assert "6/6" in capsys.readouterr().err


def test_a_server_stopped_under_a_batch_loader_is_one_clear_error(start_server):
    server = start_server(["--workers", "1"])
    loader = BatchLoader(server.address, "x", 1, "epix100", "raw", range(1000), batch_size=2,
                         output="numpy")
    batches = iter(loader)
    next(batches)
    assert server.stop() == 0
    with pytest.raises(ConnectionError, match="the server stopped or restarted"):
        for _ in batches:
            pass
    loader.close()
