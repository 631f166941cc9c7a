"""The server side must run in psana environments we cannot change: Python
3.9, standard library and numpy (psana and h5py only inside their sources)."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

ALLOWED_TOP_LEVEL = {"numpy", "psana_ipc"}
LAZY_ONLY = {"psana", "h5py"}


def test_vermin_finds_nothing_newer_than_39():
    vermin = Path(sys.executable).parent / "vermin"
    result = subprocess.run([str(vermin), "-q", "--no-tips", "--target=3.9-",
                             "--violations", "protocol", "server"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _module_level_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_server_imports_only_stdlib_and_numpy_at_module_level():
    stdlib = set(sys.stdlib_module_names)
    for folder in ("protocol", "server"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _module_level_imports(path):
                assert name in stdlib or name in ALLOWED_TOP_LEVEL, f"{path}: imports {name}"
                assert name not in LAZY_ONLY, f"{path}: imports {name} at module level"


def test_protocol_imports_nothing_but_stdlib():
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / "protocol").rglob("*.py"):
        for name in _module_level_imports(path):
            assert name in stdlib, f"{path}: imports {name}"


def _imported_modules(path):
    """Every module an import statement names, at any depth (ast, not text:
    a client may run `python -m psana_ipc.server` without importing it)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_server_and_client_never_import_each_other():
    for folder, other in (("server", "psana_ipc.client"), ("client", "psana_ipc.server")):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imported_modules(path):
                assert not name.startswith(other), f"{path} imports {other}"
