"""How the psana2 source finds runs: two experiments with the same run
number in one directory, the facility layout, a directory per experiment,
and a run given as a list of files (as psana's DataSource(files=...))."""
import numpy as np
import pytest

from psana2_helpers import (CHUNKED_EVENTS, CHUNKED_RUN, EXP, OTHER_EXP, SHARED_EVENTS,
                            SHARED_RUN, psana_python)
from psana_ipc.client import Client
from psana_ipc.protocol.errors import NOT_FOUND, ServerError
from psana_ipc.server.sources.synthetic import expected

pytestmark = pytest.mark.psana2


def psana2_server(start_server, *args: str):
    return start_server(["--source", "psana2", "--workers", "1", "--offline"] + list(args),
                        python=psana_python())


def assert_serves(client: Client, exp: str, run: int, events: int) -> None:
    assert client.info(exp, run, "epix10k2M")["events"] == events
    last = events - 1
    np.testing.assert_array_equal(client.get(exp, run, "epix10k2M", last, mode="raw"),
                                  expected("epix10k2M", "raw", last))


def not_found(client: Client, exp: str, run: int) -> str:
    with pytest.raises(ServerError) as e:
        client.info(exp, run, "epix10k2M")
    assert e.value.code == NOT_FOUND
    return e.value.message


def test_two_experiments_with_one_run_number_in_one_data_dir(start_server, psana2_shared):
    server = psana2_server(start_server, "--data-dir", str(psana2_shared.shared))
    with Client(server.address) as c:
        for exp in (EXP, OTHER_EXP, EXP):
            assert_serves(c, exp, SHARED_RUN, SHARED_EVENTS[exp])


def test_facility_layout_under_a_data_root(start_server, psana2_shared):
    """ROOT/<instrument>/<exp>/xtc: `tst` as psana2 writes it, or `TST`."""
    server = psana2_server(start_server, "--data-root", str(psana2_shared.facility))
    with Client(server.address) as c:
        for exp in (EXP, OTHER_EXP):
            assert_serves(c, exp, SHARED_RUN, SHARED_EVENTS[exp])
        assert str(psana2_shared.facility / "tst" / "tstx00119" / "xtc") in \
            not_found(c, "tstx00119", SHARED_RUN)


def test_the_default_root_is_sit_psdm_data(start_server, psana2_shared):
    server = start_server(["--source", "psana2", "--workers", "1", "--offline"],
                          python=psana_python(), env={"SIT_PSDM_DATA": str(psana2_shared.facility)})
    with Client(server.address) as c:
        assert_serves(c, OTHER_EXP, SHARED_RUN, SHARED_EVENTS[OTHER_EXP])


def test_a_directory_per_experiment(start_server, psana2_shared):
    template = str(psana2_shared.facility / "{instrument}" / "{exp}" / "xtc")
    server = psana2_server(start_server, "--data-dir", template)
    with Client(server.address) as c:
        assert_serves(c, EXP, SHARED_RUN, SHARED_EVENTS[EXP])
        assert str(psana2_shared.facility / "tst" / OTHER_EXP / "xtc") in \
            not_found(c, OTHER_EXP, SHARED_RUN)


def test_a_run_given_as_files(start_server, psana2_shared, psana2_chunked):
    chunked = psana2_chunked.chunks(CHUNKED_RUN, 0) + psana2_chunked.chunks(CHUNKED_RUN, 1)
    files = [str(p) for p in psana2_shared.files(OTHER_EXP) + chunked]
    server = psana2_server(start_server, "--files", *files)
    with Client(server.address) as c:
        assert_serves(c, OTHER_EXP, SHARED_RUN, SHARED_EVENTS[OTHER_EXP])
        assert_serves(c, EXP, CHUNKED_RUN, CHUNKED_EVENTS)
        assert "files given" in not_found(c, EXP, SHARED_RUN)


@pytest.mark.parametrize("args, message", [
    (["--files", "run7.xtc2"], "not an XTC2 file named as the DAQ names them"),
    (["--data-dir", "/data/{run}/xtc"], "only {exp} and {instrument} may be named"),
])
def test_where_psana_could_not_look_stops_the_server_with_one_line(start_server, tmp_path, args,
                                                                   message):
    if args[0] == "--files":
        args = [args[0], str(tmp_path / args[1])]
        (tmp_path / "run7.xtc2").write_bytes(b"")
    with pytest.raises(RuntimeError) as e:
        psana2_server(start_server, *args)
    assert message in str(e.value)
    assert "Traceback" not in str(e.value)
    assert "exited with status 3" in str(e.value)   # start-up's documented status
