"""PsanaImg and PsanaInterface, btx's in-environment readers, over the
server's psana sources: psana1 (the stand-in, in this process) and psana2
(real psana on a written XTC2 run, in the psana environment)."""
import sys

import numpy as np
import pytest

from psana1_standin import runs
from psana1_standin.runs import (EXP, EVENTS, RUN, STANDIN, calib_of, image_of, raw_of,
                                 write_constants, write_run)
from psana2_helpers import EVENTS as XTC2_EVENTS
from psana2_helpers import EXP as XTC2_EXP
from psana2_helpers import RUN as XTC2_RUN
from psana2_helpers import calib_of as xtc2_calib_of
from psana2_helpers import run_psana
from psana_ipc.protocol.errors import NO_CALIBRATION, OUT_OF_RANGE
from psana_ipc.server.psana_interface import PsanaImg, PsanaInterface
from psana_ipc.server.sources.base import SourceError
from psana_ipc.server.sources.synthetic import expected, timestamp_of


@pytest.fixture
def psana1(tmp_path, monkeypatch):
    """The stand-in importable as `psana` for this test only."""
    write_run(tmp_path / "psdm")
    monkeypatch.setenv("SIT_PSDM_DATA", str(tmp_path / "psdm"))
    monkeypatch.syspath_prepend(str(STANDIN))
    yield
    sys.modules.pop("psana", None)


def test_psana_img_reads_events_panels_and_assembles(psana1):
    img = PsanaImg(EXP, RUN, "idx", "epix10k2M")
    assert len(img) == EVENTS
    np.testing.assert_array_equal(img.get(2), calib_of("epix10k2M", 2))
    np.testing.assert_array_equal(img.get(2, id_panel=1, mode="raw"), raw_of("epix10k2M", 2)[1])
    np.testing.assert_array_equal(img.assemble(), image_of(calib_of("epix10k2M", 0)))
    panels = raw_of("epix10k2M", 5)
    np.testing.assert_array_equal(img.assemble(panels), image_of(panels))
    with pytest.raises(SourceError) as e:
        img.get(EVENTS)
    assert e.value.code == OUT_OF_RANGE


def test_psana_interface_batches_continue_skip_empty_events_and_track_times(psana1):
    psi = PsanaInterface(EXP, RUN, "epix10k2M", track_timestamps=True)
    first = psi.get_images(2)
    np.testing.assert_array_equal(first, [image_of(calib_of("epix10k2M", e)) for e in (0, 1)])
    rest = psi.get_images(10, assemble=False)   # event 3 has no data: skipped
    np.testing.assert_array_equal(rest, [calib_of("epix10k2M", e) for e in (2, 4, 5)])
    assert psi.get_images(1).shape == (0,) + first.shape[1:]
    assert psi.counter == EVENTS
    assert psi.timestamps == [runs.timestamp_of(e) for e in (0, 1, 2, 4, 5)]


def test_psana_interface_calibdir_and_missing_constants(psana1, tmp_path):
    constants = {"pedestal": 1.0, "gain": 3.0}
    calib_dir = write_constants(tmp_path / "alt-calib", {"epix10kaQuad": constants})
    psi = PsanaInterface(EXP, RUN, "epix10kaQuad", calibdir=str(calib_dir))
    assert psi.calibrate
    np.testing.assert_array_equal(psi.get_images(1, assemble=False)[0],
                                  calib_of("epix10kaQuad", 0, constants))
    uncalibrated = PsanaInterface(EXP, RUN, "epix10k2M", calibdir=str(calib_dir))
    assert not uncalibrated.calibrate
    np.testing.assert_array_equal(uncalibrated.get_images(1, assemble=False)[0],
                                  raw_of("epix10k2M", 0, gain_bits=False))
    with pytest.raises(SourceError) as e:
        uncalibrated.get_images(1)
    assert e.value.code == NO_CALIBRATION


# Runs in the psana environment: reads the XTC2 run with PsanaImg and
# PsanaInterface and saves what they returned for the test to check here.
READ_XTC2 = """
import sys
import numpy as np
from psana_ipc.server.psana_interface import PsanaImg, PsanaInterface, psana_flavour
xtc, calib, exp, run, out = sys.argv[1:]
where = dict(data_dir=xtc, offline=True)
img = PsanaImg(exp, int(run), "idx", "epix10k2M", calib_dir=calib, **where)
psi = PsanaInterface(exp, int(run), "epix10k2M", calibdir=calib, track_timestamps=True, **where)
first = psi.get_images(2, assemble=False)
more = psi.get_images(3, assemble=False)
np.savez(out, flavour=psana_flavour(), events=len(img), raw=img.get(1, mode="raw"),
         panel=img.get(2, id_panel=3), image=img.assemble(), first=first, more=more,
         counter=psi.counter, times=[t["time"] for t in psi.timestamps])
"""


@pytest.mark.psana2
def test_psana_img_and_interface_read_a_real_xtc2_run_with_psana2(psana2_runs, tmp_path):
    out = tmp_path / "read.npz"
    run_psana(["-c", READ_XTC2, str(psana2_runs.data_dir), str(psana2_runs.calib_dir),
               XTC2_EXP, str(XTC2_RUN), str(out)])
    got = np.load(out)
    assert str(got["flavour"]) == "psana2" and int(got["events"]) == XTC2_EVENTS
    np.testing.assert_array_equal(got["raw"], expected("epix10k2M", "raw", 1))
    np.testing.assert_allclose(got["panel"], xtc2_calib_of("epix10k2M", XTC2_RUN, 2)[3],
                               atol=1e-4)
    image = got["image"]   # every pixel placed once, by the run's geometry
    assert image.ndim == 2 and image.dtype == np.float32
    assert image.sum(dtype=np.float64) == pytest.approx(
        xtc2_calib_of("epix10k2M", XTC2_RUN, 0).sum(dtype=np.float64))
    batches = np.concatenate([got["first"], got["more"]])
    assert len(got["first"]) == 2 and len(got["more"]) == 3 and int(got["counter"]) == 5
    np.testing.assert_allclose(batches, [xtc2_calib_of("epix10k2M", XTC2_RUN, e)
                                         for e in range(5)], atol=1e-4)
    assert list(got["times"]) == [timestamp_of(e) for e in range(5)]
