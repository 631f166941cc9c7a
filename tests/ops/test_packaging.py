"""What pip installs: the license, its SPDX string, py.typed, the extras, the
version, and a build without deprecation warnings."""
import shutil
import subprocess
import sys
import zipfile

import psana_ipc

from conftest import ROOT


def test_the_wheel_carries_license_types_extras_and_version(tmp_path):
    source = tmp_path / "source"   # a copy: setuptools writes build/ beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "*.egg-info", "__pycache__", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-v",
                            "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "Deprecat" not in built.stdout + built.stderr
    (wheel,) = tmp_path.glob("psana_ipc-*.whl")
    assert wheel.name.startswith(f"psana_ipc-{psana_ipc.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "psana_ipc/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "License-Expression: BSD-3-Clause" in metadata
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    for extra in ("torch", "hdf5", "plot"):
        assert f"Provides-Extra: {extra}" in metadata
    assert 'Requires-Dist: matplotlib; extra == "plot"' in metadata
    assert "Classifier: Programming Language :: Python :: 3.9" in metadata
    assert "Project-URL:" in metadata
