"""--calib-dir hands psana every constant type the folder holds: with
pixel_status and jungfrau's pixel_offset present, calib, image and mask
equal what psana itself gives with the same constants, in another process."""
import numpy as np
import pytest

from psana2_helpers import (BAD_PIXEL_EVERY, CONSTANTS_RUN, DETECTORS, EXP, GAIN, PEDESTAL,
                            PIXEL_OFFSET, ROOT, psana_python, run_psana)
from psana_ipc.client import Client
from psana_ipc.server.sources.synthetic import expected

pytestmark = pytest.mark.psana2
EVENT = 1


def psanas_own(run, detector: str, out) -> dict:
    """psana's calib, image and mask of EVENT, from a process of its own."""
    run_psana([str(ROOT / "tests" / "psana2_image_oracle.py"), str(run.data_dir),
               str(run.calib_dir), EXP, str(CONSTANTS_RUN), detector, str(EVENT), str(out),
               "calib,image,mask"])
    return dict(np.load(out))


def test_calib_image_and_mask_are_psanas_with_every_constant(start_server, psana2_constants,
                                                            tmp_path):
    server = start_server(["--source", "psana2", "--workers", "1", "--offline",
                           "--data-dir", str(psana2_constants.data_dir),
                           "--calib-dir", str(psana2_constants.calib_dir)], python=psana_python())
    with Client(server.address) as c:
        for detector in DETECTORS:
            assert set(c.info(EXP, CONSTANTS_RUN, detector)["modes"]) == \
                {"raw", "calib", "image", "mask"}
            for mode, reference in psanas_own(psana2_constants, detector,
                                              tmp_path / f"{detector}.npz").items():
                frame = c.get(EXP, CONSTANTS_RUN, detector, EVENT, mode=mode)
                assert frame.dtype == reference.dtype and frame.shape == reference.shape
                assert frame.tobytes() == reference.tobytes(), f"{detector} {mode}"
            mask = c.get(EXP, CONSTANTS_RUN, detector, EVENT, mode="mask")
            bad = np.arange(mask.size).reshape(mask.shape) % BAD_PIXEL_EVERY == 0
            assert not mask[bad].any() and mask[~bad].all(), "pixel_status reached psana"
            calib = c.get(EXP, CONSTANTS_RUN, detector, EVENT)
            assert not calib[bad].any(), "psana zeroes bad pixels"
            offset = PIXEL_OFFSET if detector == "jungfrau4M" else 0.0
            good = (expected(detector, "raw", EVENT).astype(np.float32) - PEDESTAL - offset) / GAIN
            np.testing.assert_allclose(calib[~bad], good[~bad], atol=1e-4,
                                       err_msg="pixel_offset reached psana")
