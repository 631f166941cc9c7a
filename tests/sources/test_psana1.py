"""`iserver --source psana1` end to end, against the stand-in psana1 package
(psana1 itself cannot be installed): the server imports the stand-in as
`psana` through PYTHONPATH, the client sees what a psana1 run would give."""
import numpy as np
import pytest

from psana1_standin.runs import (EXP, EVENTS, GAIN_BITS, RUN, STANDIN, calib_of,
                                 experiment_calib_dir, image_of, raw_of, timestamp_of,
                                 write_constants, write_run)
from psana_ipc.client import Client
from psana_ipc.protocol.errors import (NO_CALIBRATION, NOT_FOUND, OUT_OF_RANGE, READ_FAILED,
                                       UNKNOWN_DETECTOR, ServerError)


@pytest.fixture(scope="module")
def psana1_server(start_module_server, tmp_path_factory):
    """One server over a written run, for the tests that only read."""
    root = tmp_path_factory.mktemp("psdm")
    write_run(root)
    return start_module_server(["--source", "psana1", "--workers", "1"],
                        env={"PYTHONPATH": str(STANDIN), "SIT_PSDM_DATA": str(root)})


def test_raw_calib_and_image_are_psana1s_with_event_timestamps(psana1_server):
    with Client(psana1_server.address) as c:
        raw, desc = c.get_frame(EXP, RUN, "epix10k2M", 2, mode="raw")
        np.testing.assert_array_equal(raw, raw_of("epix10k2M", 2))
        assert desc["timestamp"] == timestamp_of(2)
        calib, desc = c.get_frame(EXP, RUN, "MfxEndstation.0:Epix10ka2M.0", 5, mode="calib")
        assert calib.dtype == np.float32 and desc["calibrated"] is True
        np.testing.assert_array_equal(calib, calib_of("epix10k2M", 5))
        assert desc["timestamp"] == timestamp_of(5)
        image = c.get(EXP, RUN, "epix10k2M", 4, mode="image")
        np.testing.assert_array_equal(image, image_of(calib_of("epix10k2M", 4)))
        info = c.info(EXP, RUN, "epix10k2M")
        assert info["events"] == EVENTS
        assert info["modes"]["image"]["shape"] == list(image.shape)
        run_info = c.info(EXP, RUN)["detectors"]
        assert set(run_info) == {"epix10k2M", "epix10kaQuad", "opal", "epix100a"}
        assert all(d["events"] == EVENTS for d in run_info.values())


def test_missing_constants_serve_masked_raw_flagged_uncalibrated(psana1_server):
    """psana1 gives an epix10k without constants files default constants
    (pedestals 0, gain 1), not None: that is not calibrated data."""
    with Client(psana1_server.address) as c:
        info = c.info(EXP, RUN, "epix10kaQuad")
        assert info["modes"]["calib"] == {"shape": [2, 6, 10], "dtype": "uint16",
                                          "calibrated": False}
        calib, desc = c.get_frame(EXP, RUN, "epix10kaQuad", 1)
        assert desc["calibrated"] is False
        np.testing.assert_array_equal(calib, raw_of("epix10kaQuad", 1, gain_bits=False))
        raw = c.get(EXP, RUN, "epix10kaQuad", 1, mode="raw")
        assert (raw & GAIN_BITS == GAIN_BITS).all(), "raw keeps its gain bits"
        with pytest.raises(ServerError) as e:
            c.get(EXP, RUN, "epix10kaQuad", 1, mode="image")
        assert e.value.code == NO_CALIBRATION


def test_camera_without_constants_gives_its_raw_frame_as_image(psana1_server):
    with Client(psana1_server.address) as c:
        image, desc = c.get_frame(EXP, RUN, "opal", 0, mode="image")
        assert desc["calibrated"] is False
        np.testing.assert_array_equal(image, raw_of("opal", 0))


def test_event_without_data_is_an_error_naming_it_and_serving_goes_on(psana1_server):
    with Client(psana1_server.address) as c:
        with pytest.raises(ServerError) as e:
            c.get(EXP, RUN, "epix10k2M", 3, mode="calib")
        assert e.value.code == READ_FAILED and "event 3" in e.value.message
        np.testing.assert_array_equal(c.get(EXP, RUN, "epix10k2M", 4, mode="raw"),
                                      raw_of("epix10k2M", 4))


def test_unknown_detector_missing_run_and_event_past_the_end(psana1_server):
    with Client(psana1_server.address) as c:
        with pytest.raises(ServerError) as e:
            c.get(EXP, RUN, "cspad", 0)
        assert e.value.code == UNKNOWN_DETECTOR and "epix10k2M" in e.value.message
        with pytest.raises(ServerError) as e:
            c.get(EXP, RUN + 1, "epix10k2M", 0)
        assert e.value.code == NOT_FOUND
        with pytest.raises(ServerError) as e:
            c.get(EXP, RUN, "epix10k2M", EVENTS)
        assert e.value.code == OUT_OF_RANGE


def test_data_dir_and_calib_dir_options_reach_psana1(start_server, tmp_path):
    """--data-dir becomes the dataset's dir=, --calib-dir psana's option
    psana.calib-dir, set before the DataSource exists (psana1 ignores it
    afterwards)."""
    xtc = write_run(tmp_path / "elsewhere")
    constants = {"pedestal": 3.0, "gain": 2.0}
    calib_dir = write_constants(tmp_path / "my-calib", {"epix10kaQuad": constants})
    server = start_server(["--source", "psana1", "--workers", "1", "--data-dir", str(xtc),
                           "--calib-dir", str(calib_dir)],
                          env={"PYTHONPATH": str(STANDIN), "SIT_PSDM_DATA": str(tmp_path / "none")})
    with Client(server.address) as c:
        calib, desc = c.get_frame(EXP, RUN, "epix10kaQuad", 2)
        assert desc["calibrated"] is True
        np.testing.assert_array_equal(calib, calib_of("epix10kaQuad", 2, constants))
        _, desc = c.get_frame(EXP, RUN, "epix10k2M", 2)
        assert desc["calibrated"] is False, "constants come from --calib-dir only"


def test_default_calib_dir_is_the_experiments_whatever_the_data_dir(start_server, tmp_path):
    """Without --calib-dir psana1 reads $SIT_PSDM_DATA/<INSTR>/<exp>/calib,
    not the calib dir beside --data-dir's xtc dir."""
    xtc = write_run(tmp_path / "elsewhere")
    constants = {"pedestal": 4.0, "gain": 0.25}
    write_constants(experiment_calib_dir(tmp_path / "psdm"), {"epix10k2M": constants})
    server = start_server(["--source", "psana1", "--workers", "1", "--data-dir", str(xtc)],
                          env={"PYTHONPATH": str(STANDIN), "SIT_PSDM_DATA": str(tmp_path / "psdm")})
    with Client(server.address) as c:
        calib, desc = c.get_frame(EXP, RUN, "epix10k2M", 1)
        assert desc["calibrated"] is True
        np.testing.assert_array_equal(calib, calib_of("epix10k2M", 1, constants))
