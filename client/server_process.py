"""Start an iserver as a subprocess and wait until it accepts: the one way
Python callers (scripts, tests, notebooks) run a server of their own.

It runs `python -m psana_ipc.server` with the python of the environment the
server belongs in (the psana one for psana sources), so the client never
imports the server. Readiness is the server's ready file, never a sleep.

    with ServerProcess(["--workers", "2"]) as server:
        Client(server.address).ping()
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


def child_pids(pid: int) -> List[int]:
    """Child pids of a process (of every thread of it), from /proc; a process or
    thread that exits meanwhile simply has none."""
    children: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return children


class ServerStartError(RuntimeError):
    """The server exited, or did not become ready in time; the message has its log."""


class ServerProcess:
    """An iserver subprocess, constructed once its ready file says it accepts.

    Args:
        args: iserver options; `--port 0` (a free port) comes first, so
            `--port` or `--unix` in `args` override it.
        python: the interpreter to run it with (default: this one).
        ready_file: where the server writes its ready file (default: a
            temporary directory removed at `stop`).
        log_file: stdout and stderr of the server go here (default: inherited).
        env: variables added to this process's environment.
        timeout: seconds to wait for the ready file.
        launcher: a command the server is run through, which ends by running
            it in its own place (e.g. one that puts it in another network
            namespace); signals go to the process started.

    Attributes: `proc` (the Popen), `ready` (the ready file's JSON), `address`,
    `pid`, `ready_file`.
    """

    def __init__(self, args: Sequence[str] = (), *, python: Optional[str] = None,
                 ready_file: Optional[PathLike] = None, log_file: Optional[PathLike] = None,
                 env: Optional[Dict[str, str]] = None, timeout: float = 60.0,
                 launcher: Sequence[str] = ()) -> None:
        self._tmp = None if ready_file else tempfile.TemporaryDirectory(prefix="iserver-")
        self.ready_file = Path(ready_file or os.path.join(self._tmp.name, "ready.json"))
        self.log_file = Path(log_file) if log_file else None
        cmd = [*launcher, python or sys.executable, "-m", "psana_ipc.server", "--port", "0",
               "--ready-file", str(self.ready_file), *args]
        self._log = open(self.log_file, "wb") if self.log_file else None
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT
                                     if self._log else None, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        self.ready = self._wait_ready(timeout)
        self.address: str = self.ready["address"]

    def _wait_ready(self, timeout: float) -> Dict[str, object]:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                self._close_log()
                raise ServerStartError(f"iserver exited with status {self.proc.returncode}"
                                       f"{self._log_tail()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self._close_log()
                raise ServerStartError(f"iserver not ready after {timeout:.0f}s"
                                       f"{self._log_tail()}")
            time.sleep(0.02)
        return json.loads(self.ready_file.read_text())

    @property
    def workers(self) -> List[int]:
        """Worker pids as the ready file listed them at start-up."""
        return list(self.ready["workers"])

    def log(self) -> str:
        """What the server wrote so far ("" without `log_file`)."""
        if self._log:
            self._log.flush()
        return self.log_file.read_text(errors="replace") if self.log_file else ""

    def _log_tail(self) -> str:
        text = self.log()
        return f":\n{text[-4000:]}" if text else ""

    def _close_log(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server, wait for it, and return its exit status; a server
        that ignores the signal is killed and TimeoutError raised."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise TimeoutError(f"iserver ignored signal {sig}{self._log_tail()}") \
                        from None
            return self.proc.returncode
        finally:
            self._close_log()
            if self._tmp:
                self._tmp.cleanup()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
