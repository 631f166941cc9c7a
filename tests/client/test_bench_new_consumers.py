"""`scripts/bench.py --new-consumers` runs every row it reports (the legacy
dialect, reused and fresh loaders, a second client of the frame cache on a
server made ahead and on one made just now, a cold epoch with and without a
cache) and finds the second client's frames to be the source's (never
asserting a time)."""
from conftest import run_bench


def test_bench_new_consumers_runs_and_checks_the_cached_frames(tmp_path):
    done, report = run_bench(tmp_path, "--new-consumers", "--detectors", "epix100",
                             "--frames", "8", "--cache-frames", "8", "--batch-size", "4",
                             "--cost-ms", "1", "--repeats", "1", "--loader-workers", "1",
                             "--user-wait", "1", "--user-cache", "64M")
    assert done.returncode == 0, done.stderr
    assert set(report["rows"]) == {"legacy", "one loader, every epoch",
                                   "a new loader every epoch"}
    assert set(report["second_client"]) == {"server ready before", "server started just now"}
    for row in report["second_client"].values():
        assert row["bytes identical"] is True and min(row["first epoch"],
                                                      row["second client"]) > 0
    assert min(report["user_epoch_fps"].values()) > 0
    assert "bytes identical" in done.stdout and "DIFFERENT" not in done.stdout
