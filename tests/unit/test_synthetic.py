"""The synthetic source: its per-event cost is CPU work, as psana's is."""
import time

import numpy as np

from psana_ipc.server.sources.synthetic import SyntheticSource, expected


def test_cost_burns_cpu_time_and_leaves_the_frame_as_it_is():
    source = SyntheticSource("epix100", events=10, cost_s=0.05)
    cpu0 = time.thread_time()
    frame, meta = source.read(7, "raw")
    assert time.thread_time() - cpu0 >= 0.05          # a sleep would use almost none
    assert np.array_equal(frame, expected("epix100", "raw", 7))

