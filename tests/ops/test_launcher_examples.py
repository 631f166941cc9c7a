"""The example jobs in scripts/slurm: the training loop runs against a real
server, and the incremental PCA agrees with a PCA of all frames at once."""
import json
import subprocess
import sys

import numpy as np
from slurm.jobs import EXAMPLES


def test_training_example_trains_on_served_frames(server, tmp_path):
    summary = tmp_path / "train.json"
    subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--address", server.address,
                    "--exp", "exp", "--run", "1", "--detector", "epix10k2M", "--events", "6",
                    "--epochs", "2", "--loader-workers", "2", "--summary", str(summary)],
                   check=True, timeout=120)
    result = json.loads(summary.read_text())
    assert result["events"] == list(range(6)) and result["frames"] == 12
    assert np.isfinite(result["final_loss"])


def test_incremental_pca_matches_pca_of_all_frames(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from pca import IncrementalPCA

    rng = np.random.default_rng(0)
    frames = rng.normal(size=(12, 40)) @ np.diag(np.linspace(3, 0.1, 40))
    pca = IncrementalPCA(components=11)  # 12 centred frames span 11 directions: kept all, exact
    for batch in np.split(frames, 4):
        pca.partial_fit(batch)
    centred = frames - frames.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.mean, frames.mean(0), atol=1e-12)
    np.testing.assert_allclose(pca.singular_values, s[:11], rtol=1e-9)
    np.testing.assert_allclose(np.abs(pca.components @ vt[:11].T), np.eye(11), atol=1e-6)
