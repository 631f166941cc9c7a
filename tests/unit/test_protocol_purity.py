"""protocol/ is sans-I/O: it turns bytes and text into messages and back, and
never touches a socket, a file, a directory or the environment. Reading the
source with `ast` keeps it so: I/O belongs to the server and the client."""
import ast
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import ROOT

IO_MODULES = {
    "socket", "_socket", "socketserver", "ssl", "select", "selectors", "asyncio", "subprocess",
    "multiprocessing", "signal", "mmap", "fcntl", "termios", "pty", "resource", "posix", "nt",
    "shutil", "pathlib", "io", "_io", "tempfile", "glob", "fileinput", "builtins", "importlib",
    "urllib", "http", "ftplib", "smtplib", "sqlite3", "shelve", "dbm", "ctypes",
}
IO_BUILTINS = {"open", "input", "print", "__import__"}
# What of `os` is pure string work; everything else in it reads or changes the system.
PURE_OS = {"os.path.join", "os.path.basename", "os.path.dirname", "os.path.split",
           "os.path.splitext", "os.path.normpath", "os.path.isabs", "os.sep", "os.fspath"}
_OS_MODULES = {"os", "os.path"}


def _dotted(node: ast.AST) -> List[str]:
    """["a", "b", "c"] for the expression `a.b.c`, [] for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id] + parts[::-1] if isinstance(node, ast.Name) else []


def io_uses(source: str) -> List[str]:
    """Every place in `source` that imports an I/O module, uses `os` beyond
    PURE_OS, or calls an I/O builtin, as "line N: what"."""
    found: List[str] = []
    os_names: Dict[str, str] = {}   # local name -> "os" or "os.path"
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in IO_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name}")
                elif root == "os":
                    os_names[alias.asname or "os"] = alias.name if alias.asname else "os"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in IO_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module in _OS_MODULES:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in _OS_MODULES:
                        os_names[alias.asname or alias.name] = full
                    elif full not in PURE_OS:
                        found.append(f"line {node.lineno}: from {node.module} import {alias.name}")

    def visit(node: ast.AST) -> None:
        parts = _dotted(node)
        if parts and parts[0] in os_names:
            full = ".".join([os_names[parts[0]]] + parts[1:])
            if full not in PURE_OS:
                found.append(f"line {node.lineno}: {full}")
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in IO_BUILTINS:
            found.append(f"line {node.lineno}: {node.func.id}(...)")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


PROTOCOL_FILES = sorted((ROOT / "protocol").glob("*.py"))


def test_protocol_package_is_found():
    names = {path.name for path in PROTOCOL_FILES}
    assert {"__init__.py", "address.py", "shm_names.py", "framing.py"} <= names


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=lambda path: path.name)
def test_protocol_module_does_no_io(path: Path):
    assert io_uses(path.read_text()) == [], f"{path.name} does I/O; move it to server/ or client/"


@pytest.mark.parametrize("source", [
    "import socket",
    "import select",
    "import selectors as s",
    "import subprocess",
    "from mmap import mmap",
    "import fcntl",
    "import shutil",
    "from pathlib import Path",
    "import os.path\nos.path.exists('/dev/shm')",
    "import os\nos.environ.get('PSANA_IPC_ADDRESS')",
    "import os\nx = os.environ['PSANA_IPC_ADDRESS']",
    "import os\nos.getenv('X')",
    "import os\nos.listdir('/dev/shm')",
    "import os\nfd = os.open('/dev/shm/x', 0)",
    "import os as o\no.unlink('x')",
    "from os import listdir",
    "from os import environ as env",
    "from os import path\npath.isfile('x')",
    "from os.path import exists",
    "import os\nf = os",
    "with open('ready.json') as f:\n    pass",
    "def f():\n    return open('ready.json').read()",
    "print('x')",
])
def test_the_check_finds_io(source: str):
    assert io_uses(source), source


@pytest.mark.parametrize("source", [
    "import json\nimport re\nimport struct\nfrom typing import Any",
    "import os\nname = os.path.join('/dev/shm', 'psipc_1_2_3')",
    "from os.path import join\njoin('a', 'b')",
    "from . import PROTOCOL_VERSION\nfrom .errors import ProtocolError",
    "def f(open):\n    return open",   # a parameter named open is not the builtin called
    "family = 'AF_UNIX'",
])
def test_the_check_lets_pure_code_pass(source: str):
    assert io_uses(source) == []
