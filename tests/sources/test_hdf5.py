"""`iserver --source hdf5` end to end: files written with h5py, served by a
real server, compared byte for byte with what was written."""
import h5py
import numpy as np
import pytest

from psana_ipc.client import Client
from psana_ipc.protocol.errors import NOT_FOUND, UNKNOWN_DETECTOR, UNKNOWN_MODE, ServerError

EXP, RUN = "cxitest", 3
PANELS = np.random.default_rng(7).integers(0, 1 << 16, (5, 4, 16, 24), dtype=np.uint16)
FRAMES = np.random.default_rng(8).normal(100.0, 30.0, (5, 16, 20))


@pytest.fixture
def hdf5_root(tmp_path):
    """A CXI-style file: the frames in the instrument group, entry_1/data_1/data
    a soft link to them as CXI has it; float64 2-D frames in a second dataset.
    Chunks of two events and gzip, so events straddle compressed chunks."""
    (tmp_path / EXP).mkdir()
    with h5py.File(tmp_path / EXP / f"r{RUN:04d}.h5", "w") as f:
        f.create_dataset("entry_1/instrument_1/detector_1/data", data=PANELS,
                         chunks=(2, 4, 16, 24), compression="gzip", compression_opts=6)
        f["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        f.create_dataset("scan/frames", data=FRAMES, chunks=(3, 8, 20), compression="gzip")
        f.create_dataset("scan/energy", data=np.arange(5.0))
    return tmp_path


def test_chunked_gzip_dataset_is_served_byte_exact(start_server, hdf5_root):
    server = start_server(["--source", "hdf5", "--hdf5-root", str(hdf5_root), "--workers", "1"])
    with Client(server.address) as c:
        for event in range(len(PANELS)):
            raw = c.get(EXP, RUN, "entry_1/data_1/data", event, mode="raw")
            assert raw.dtype == PANELS.dtype
            assert raw.tobytes() == PANELS[event].tobytes()
        calib, desc = c.get_frame(EXP, RUN, "scan/frames", 4, mode="calib")
        np.testing.assert_array_equal(calib, FRAMES[4].astype(np.float32))
        assert calib.dtype == np.float32 and desc["calibrated"] is False
        info = c.info(EXP, RUN, "scan/frames")
        assert info["events"] == 5 and set(info["modes"]) == {"raw", "calib", "image"}
        assert c.info(EXP, RUN)["detectors"] == {
            "entry_1/instrument_1/detector_1/data": {"path": "entry_1/instrument_1/detector_1/data",
                                                     "events": 5, "shape": [4, 16, 24],
                                                     "dtype": "uint16"},
            "scan/frames": {"path": "scan/frames", "events": 5, "shape": [16, 20],
                            "dtype": "float64"}}


def test_cxi_detector_names_through_a_dataset_template(start_server, hdf5_root, tmp_path):
    """With --hdf5-dataset 'entry_1/{detector}/data' a CXI file's data_1 is a
    detector, and an absolute --hdf5-pattern ignores --hdf5-root."""
    pattern = str(hdf5_root / "{exp}" / "r{run:04d}.h5")
    elsewhere = tmp_path / "elsewhere"   # exists (start-up checks that), holds no run
    elsewhere.mkdir()
    server = start_server(["--source", "hdf5", "--hdf5-root", str(elsewhere), "--workers", "1",
                           "--hdf5-pattern", pattern, "--hdf5-dataset", "entry_1/{detector}/data"])
    with Client(server.address) as c:
        np.testing.assert_array_equal(c.get(EXP, RUN, "data_1", 3, mode="raw"), PANELS[3])
        assert list(c.info(EXP, RUN)["detectors"]) == ["instrument_1/detector_1"]


def test_missing_file_dataset_and_mode_are_clear_errors(start_server, hdf5_root):
    server = start_server(["--source", "hdf5", "--hdf5-root", str(hdf5_root), "--workers", "1"])
    with Client(server.address) as c:
        for args, mode, code in (((EXP, RUN + 1, "scan/frames", 0), "raw", NOT_FOUND),
                                 ((EXP, RUN, "scan/missing", 0), "raw", UNKNOWN_DETECTOR),
                                 ((EXP, RUN, "scan/energy", 0), "raw", UNKNOWN_DETECTOR),
                                 ((EXP, RUN, "entry_1/data_1/data", 0), "image", UNKNOWN_MODE),
                                 ((EXP, RUN, "scan/frames", 0), "mask", UNKNOWN_MODE)):
            with pytest.raises(ServerError) as e:
                c.get(*args, mode=mode)
            assert e.value.code == code, (args, mode)
        np.testing.assert_array_equal(c.get(EXP, RUN, "scan/frames", 1, mode="image"),
                                      FRAMES[1].astype(np.float32))
