"""`scripts/bench.py --resume` runs and reports the time to a first batch fresh, resumed mid-epoch and read up to again, for BatchLoader and ResumableDataLoader (never asserting a time)."""
from conftest import run_bench


def test_bench_resume_runs_and_writes_its_json(tmp_path):
    done, report = run_bench(tmp_path, "--resume", "--detectors", "epix100", "--frames", "8",
                             "--batch-size", "2", "--repeats", "1", "--loader-workers", "1")
    assert done.returncode == 0, done.stderr
    assert report["resumed_at_batch"] == 2
    assert set(report["rows"]) == {"BatchLoader", "ResumableDataLoader, 1 workers"}
    for row in report["rows"].values():
        assert set(row) == {"fresh_ms", "resumed_ms", "reread_ms"} and min(row.values()) > 0
    assert "| BatchLoader |" in done.stdout
