#!/usr/bin/env python
"""Time what a server worker spends per event in the psana2 source: reading
the event through psana and writing the frame into memory it is given (as
`read_into` does into shared memory), per detector and mode. The first read
of each mode (psana builds its calibration and geometry caches then) is shown
apart from the steady state. Run it in the psana environment on a run that
scripts/make_xtc2_run.py wrote:

    .venv-psana/bin/python scripts/make_xtc2_run.py --outdir /tmp/xtc -n 20 --calib-dir /tmp/calib
    .venv-psana/bin/python scripts/time_psana2_source.py --data-dir /tmp/xtc --calib-dir /tmp/calib
"""
import argparse
import random
import statistics
import sys
import time
from typing import List

import numpy as np

from psana_ipc.protocol.messages import RunKey
from psana_ipc.server.sources.psana2 import Factory

MODES = ("raw", "calib", "image")


def time_reads(source, mode: str, events: List[int]) -> List[float]:
    """Seconds per `read_into` of each event, into freshly allocated memory."""
    took = []
    for event in events:
        start = time.perf_counter()
        source.read_into(event, mode, lambda shape, dtype: np.empty(shape, dtype))
        took.append(time.perf_counter() - start)
    return took


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the run's XTC2 directory")
    parser.add_argument("--calib-dir", help="constants, as for iserver --calib-dir")
    parser.add_argument("--exp", default="tstx00117", help="(default: %(default)s)")
    parser.add_argument("--run", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--detectors", nargs="+", default=["epix10k2M", "jungfrau4M"])
    parser.add_argument("--reads", type=int, default=20,
                        help="timed reads per detector and mode, random events "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)

    factory = Factory(argparse.Namespace(data_dir=args.data_dir, data_root=None, files=[],
                                         offline=True, calib_dir=args.calib_dir))
    rng = random.Random(0)
    print(f"{'detector':<12}{'mode':<7}{'shape':<17}{'first ms':>9}{'median ms':>11}"
          f"{'mean ms':>9}{'max ms':>8}")
    for detector in args.detectors:
        start = time.perf_counter()
        source = factory.open(RunKey(args.exp, args.run, detector))
        print(f"{detector:<12}open   {'':<17}{1e3 * (time.perf_counter() - start):>9.1f}")
        for mode in MODES:
            events = [rng.randrange(len(source)) for _ in range(args.reads + 1)]
            first, *rest = time_reads(source, mode, events)
            shape = "x".join(map(str, source.read(0, mode)[0].shape))
            print(f"{detector:<12}{mode:<7}{shape:<17}{1e3 * first:>9.1f}"
                  f"{1e3 * statistics.median(rest):>11.1f}{1e3 * statistics.mean(rest):>9.1f}"
                  f"{1e3 * max(rest):>8.1f}")
        source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
