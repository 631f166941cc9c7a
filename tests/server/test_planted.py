"""Files and names that belong to someone else: names planted in /dev/shm
are never in the way (frames, batch buffers and legacy segments are all
served past 48 of them), never removed, and never crash the master;
`psana-ipc cleanup` decides liveness from the lock a live master holds,
whatever its command line, and skips (saying so) what is not this user's."""
import json
import os
import socket
import sys

from psana_ipc.protocol.address import parse_address
from psana_ipc.protocol.shm_names import lock_name, segment_path
from psana_ipc.server.shm import our_segments

from conftest import pid_alive, psana_ipc
from faulty_source.probes import run_in_private_shm


def test_names_planted_by_another_user_are_passed_over_and_left_alone():
    report = run_in_private_shm("faulty_source.planted", "16m,mode=1777,uid=4242")
    assert report["served_past_planted_names"], report["log"]
    assert report["master_alive_after_sweep"] and report["served_after_sweep"], report["log"]
    assert report["exit_code"] == 0, report["log"]
    assert report["planted_untouched"]
    assert report["cleanup_rc"] == 0, report["cleanup_out"]
    assert "not this user's" in report["cleanup_out"]
    assert report["foreign_untouched"]
    assert report["at_end"] == []


def test_cleanup_keeps_a_live_server_whatever_its_command_line(start_server, tmp_path):
    entry = tmp_path / "serve.py"
    entry.write_text("import sys\nfrom psana_ipc.server.cli import main\nsys.exit(main())\n")
    wrapper = tmp_path / "launch"
    wrapper.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {entry} \"$@\"\n")
    wrapper.chmod(0o755)
    server = start_server(["--workers", "1"], python=str(wrapper))   # drops "-m psana_ipc.server"
    cmdline = open(f"/proc/{server.pid}/cmdline", "rb").read()
    assert b"iserver" not in cmdline and b"psana_ipc" not in cmdline
    with socket.create_connection(parse_address(server.address)) as sock:   # a legacy segment
        sock.sendall(json.dumps({"exp": "x", "run": 1, "detector_name": "epix100",
                                 "event": 0, "mode": "raw"}).encode())
        name = json.loads(sock.recv(4096))["name"]
        result = psana_ipc("cleanup")
        assert result.returncode == 0, result.stderr
        assert f"server {server.pid} is running" in result.stdout
        assert name in set(our_segments(server.pid))
        sock.sendall(b"ACK")
    assert pid_alive(server.pid)
    server.stop()
    assert not list(our_segments(server.pid))
    assert not os.path.exists(segment_path(lock_name(server.pid)))     # removed at stop
