"""The two environments psana-ipc joins: psana data served from the psana
environment (no torch) into a torch DataLoader in this one (no psana)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from psana2_helpers import EXP, RUN, calib_of, psana_python
from psana_ipc.client import IPCRemotePsanaDataset
from psana_ipc.server.sources.synthetic import expected

pytestmark = pytest.mark.psana2


def cannot_import(python: str, module: str) -> bool:
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_each_environment_lacks_the_others_package():
    assert cannot_import(sys.executable, "psana")
    assert cannot_import(psana_python(), "torch")


def test_dataloader_with_two_workers_reads_a_psana2_server(start_server, psana2_runs):
    server = start_server(psana2_runs.server_args(psana2_runs.calib_dir, workers=2),
                          python=psana_python())
    events = [9, 2, 11, 0, 5, 7]
    for detector, mode, reference in (
            ("jungfrau4M", "raw", lambda e: expected("jungfrau4M", "raw", e)),
            ("epix10k2M", "calib", lambda e: calib_of("epix10k2M", RUN, e))):
        requests = [(EXP, RUN, "idx", detector, e) for e in events]
        dataset = IPCRemotePsanaDataset(server.address, requests, mode=mode)
        loader = DataLoader(dataset, batch_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(events) // 2
        frames = torch.cat(batches).numpy()
        for frame, event in zip(frames, events):
            np.testing.assert_allclose(frame, reference(event), atol=1e-4)
