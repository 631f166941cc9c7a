"""The /dev/shm guard every test runs under looks only at what the suite's
own processes made: on a shared node, other users' servers are neither
reported nor touched."""
import os
import subprocess
import sys

from conftest import SHM, OurProcesses, ShmGuard

MAKER = """
import mmap, os, sys, time
fd = os.open("/dev/shm/" + sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096)
print("mapped", flush=True)
sys.stdin.read()
"""


def test_foreign_entries_are_neither_reported_nor_removed():
    ours = OurProcesses()
    guard = ShmGuard(ours)
    foreign = [f"psipc_1_1_{os.getpid():x}", f"mpich_shm_foreign_{os.getpid()}"]
    mine = f"psipc_{os.getpid()}_{os.getpid()}_guardtest"
    try:
        for name in foreign + [mine]:
            (SHM / name).write_bytes(b"x")
        assert guard.leaked(grace=0) == {mine}
        assert not (SHM / mine).exists()
        assert all((SHM / name).exists() for name in foreign)
    finally:
        for name in foreign + [mine]:
            (SHM / name).unlink(missing_ok=True)


def test_a_file_a_child_maps_is_ours_whatever_its_name():
    ours = OurProcesses()
    guard = ShmGuard(ours)
    name = f"mpich_shm_guardtest_{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", MAKER, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "mapped"
        ours.scan()                       # the session's watcher does this every 0.1 s
    finally:
        child.communicate("")
    assert guard.leaked(grace=0) == {name}
    assert not (SHM / name).exists()
