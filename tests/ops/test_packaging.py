"""What pip installs: the license, its SPDX string, py.typed, the extras, the
version, and a build without deprecation warnings."""
import zipfile

import psana_ipc

from conftest import ROOT


def test_the_wheel_carries_license_types_extras_and_version(project_wheel):
    wheel, output = project_wheel
    assert "Deprecat" not in output
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
