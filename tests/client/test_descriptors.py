"""A client works in a process holding thousands of descriptors, as training
processes do (torch's file-descriptor sharing): its socket past 1024 is
fine, also when the server has closed it for being idle."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, resource, sys, time
    import numpy as np
    from psana_ipc.client import Client
    from psana_ipc.server.sources.synthetic import expected
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    with Client(sys.argv[1]) as c:
        first = c.get("x", 1, "epix100", 3, mode="raw")
        assert c._sock.fileno() > 1024, c._sock.fileno()
        time.sleep(float(sys.argv[2]))            # the server closes the idle connection
        second = c.get("x", 1, "epix100", 4, mode="raw")
        with c.view("x", 1, "epix100", 5, mode="raw") as f:
            third = np.array(f.array)
    for got, event in ((first, 3), (second, 4), (third, 5)):
        assert np.array_equal(got, expected("epix100", "raw", event)), event
    print("ok", held[-1])
""")


def test_a_client_whose_socket_is_past_descriptor_1024(start_server):
    server = start_server(["--workers", "1", "--idle-timeout", "1"])
    result = subprocess.run([sys.executable, "-c", SCRIPT, server.address, "1.5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
