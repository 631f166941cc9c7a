"""`scripts/bench.py` with its defaults runs every row (never asserting a speed)."""
from conftest import run_bench


def test_bench_every_row_runs_on_its_default_budget(tmp_path):
    """The default run's largest batches (jungfrau4M, batches of 20: four buffers
    of 335 MB for the arena row) fit the share of the budget a lone client has."""
    done, report = run_bench(tmp_path, "--detectors", "jungfrau4M", "--frames", "40",
                             "--repeats", "1")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in report["rows"]}
    assert {"legacy", "dataset-w2", "zero-copy", "arena", "memcpy"} <= set(rows)
    assert all(r["frames_per_s"] > 0 for r in rows.values())
