"""`iserver --source psana2` end to end: a server in the psana environment
reads XTC2 runs written by psana's own writer, offline, and a client in this
environment (no psana) checks every frame against what was written."""
import numpy as np
import pytest

from psana2_helpers import (DETECTORS, EVENTS, EXP, GAIN_BITS_RUN, OTHER_EVENTS, OTHER_RUN, ROOT,
                            RUN, calib_of, psana_python, run_psana)
from psana_ipc.client import Client
from psana_ipc.protocol.errors import (NO_CALIBRATION, NO_GEOMETRY, NOT_FOUND, OUT_OF_RANGE,
                                       UNKNOWN_DETECTOR, ServerError)
from psana_ipc.server.sources.synthetic import expected, timestamp_of

pytestmark = pytest.mark.psana2


@pytest.fixture(scope="module")
def calibrated_server(start_module_server, psana2_runs):
    """One server for the tests that only read (its worker keeps the runs open)."""
    return start_module_server(psana2_runs.server_args(psana2_runs.calib_dir),
                               python=psana_python())


def error_code(client: Client, *args, **kwargs) -> str:
    with pytest.raises(ServerError) as e:
        client.get(*args, **kwargs)
    return e.value.code


def test_raw_in_random_order_is_the_written_bytes(calibrated_server):
    with Client(calibrated_server.address) as c:
        run_info = c.info(EXP, RUN)["detectors"]
        assert set(run_info) == set(DETECTORS)
        assert all(d["events"] == EVENTS for d in run_info.values())
        for event in (7, 0, 11, 3, 3, 9):
            for detector in DETECTORS:
                raw, desc = c.get_frame(EXP, RUN, detector, event, mode="raw")
                assert raw.dtype == np.uint16
                np.testing.assert_array_equal(raw, expected(detector, "raw", event))
                assert desc["timestamp"] == {"time": timestamp_of(event)}


def test_calib_is_raw_minus_pedestal_over_gain(calibrated_server):
    with Client(calibrated_server.address) as c:
        for detector in DETECTORS:
            info = c.info(EXP, RUN, detector)
            assert info["events"] == EVENTS
            assert info["modes"]["calib"]["calibrated"] is True
            for event in (5, 2):
                calib, desc = c.get_frame(EXP, RUN, detector, event)
                assert desc["calibrated"] is True and calib.dtype == np.float32
                np.testing.assert_allclose(calib, calib_of(detector, RUN, event), atol=1e-4)


def test_image_is_psanas_own(calibrated_server, psana2_runs, tmp_path):
    """The reference image comes from psana itself, called directly."""
    oracle = str(ROOT / "tests" / "psana2_image_oracle.py")
    with Client(calibrated_server.address) as c:
        for detector in DETECTORS:
            out = tmp_path / f"{detector}.npz"
            run_psana([oracle, str(psana2_runs.data_dir), str(psana2_runs.calib_dir), EXP,
                       str(RUN), detector, "6", str(out)])
            reference = np.load(out)["image"]
            image = c.get(EXP, RUN, detector, 6, mode="image")
            assert image.ndim == 2 and image.shape == reference.shape
            np.testing.assert_array_equal(image, reference)
            assert c.info(EXP, RUN, detector)["modes"]["image"]["shape"] == list(image.shape)
            assert image.max() == calib_of(detector, RUN, 6).max()


def test_missing_constants_serve_masked_raw_with_a_warning(start_server, psana2_runs):
    server = start_server(psana2_runs.server_args(), python=psana_python())
    with Client(server.address) as c:
        calib, desc = c.get_frame(EXP, GAIN_BITS_RUN, "epix10k2M", 1)
        assert desc["calibrated"] is False and calib.dtype == np.uint16
        np.testing.assert_array_equal(calib, expected("epix10k2M", "raw", 1))
        raw = c.get(EXP, GAIN_BITS_RUN, "epix10k2M", 1, mode="raw")
        np.testing.assert_array_equal(raw, expected("epix10k2M", "raw", 1) | 0xC000)
        calib, desc = c.get_frame(EXP, RUN, "jungfrau4M", 4)
        assert desc["calibrated"] is False
        np.testing.assert_array_equal(calib, expected("jungfrau4M", "raw", 4))
        assert c.info(EXP, RUN, "jungfrau4M")["modes"]["calib"] == {
            "shape": [8, 512, 1024], "dtype": "uint16", "calibrated": False}
        assert error_code(c, EXP, RUN, "jungfrau4M", 0, mode="image") == NO_CALIBRATION
    assert "calibration data unavailable for epix10k2M" in server.log()
    assert "calibration data unavailable for jungfrau4M" in server.log()


def test_bad_requests_get_error_replies_and_serving_goes_on(start_server, psana2_runs):
    server = start_server(psana2_runs.server_args(psana2_runs.no_geometry), python=psana_python())
    with Client(server.address) as c:
        assert error_code(c, EXP, RUN, "cspad", 0) == UNKNOWN_DETECTOR
        assert error_code(c, EXP, RUN, "epix10k2M", EVENTS, mode="raw") == OUT_OF_RANGE
        assert error_code(c, EXP, 99, "epix10k2M", 0) == NOT_FOUND
        with pytest.raises(ServerError) as e:
            c.info(EXP, 99)
        assert e.value.code == NOT_FOUND and f"run 99 of {EXP} not found" in e.value.message
        assert error_code(c, "xpptut15", RUN, "epix10k2M", 0) == NOT_FOUND
        assert error_code(c, EXP, RUN, "epix10k2M", 0, mode="image") == NO_GEOMETRY
        np.testing.assert_allclose(c.get(EXP, RUN, "epix10k2M", 0),
                                   calib_of("epix10k2M", RUN, 0), atol=1e-4)


def test_two_runs_in_one_worker_keep_their_own_constants(calibrated_server):
    """psana shares one detector object per name within a process; a worker
    serving two runs of the same detectors alternately must still calibrate
    each with its own constants."""
    with Client(calibrated_server.address) as c:
        for step in range(2 * OTHER_EVENTS):
            run, event = (RUN, step) if step % 2 == 0 else (OTHER_RUN, step // 2)
            for detector in DETECTORS:
                calib = c.get(EXP, run, detector, event)
                np.testing.assert_allclose(calib, calib_of(detector, run, event), atol=1e-4,
                                           err_msg=f"{detector} run {run} event {event}")
        assert c.info(EXP, OTHER_RUN, "epix10k2M")["events"] == OTHER_EVENTS
