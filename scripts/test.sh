#!/usr/bin/env bash
# Build both environments if needed (scripts/setup_envs.sh), then run every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k legacy
# --quick: only .venv (no psana environment), and only the in-process unit tests
# (tests/unit) and the v1 server's, for the inner loop of development.
# Each folder of tests/ is a marker: scripts/test.sh -m server runs that folder.
# The full run spreads modules over 3 pytest processes (pytest-xdist: one's waits
# on servers and subprocesses are another's CPU); -n 0 runs them in this one.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite starts hundreds of Python processes (servers, ranks, clients): with
# PYTHONDONTWRITEBYTECODE set (as many images set it) each compiles the project
# anew, and in each that imports numpy OpenBLAS's idle threads spin for ~0.15 s
# of CPU; the tests use no BLAS worth a thread.
unset PYTHONDONTWRITEBYTECODE
export OPENBLAS_NUM_THREADS=1
if [ "${1:-}" = --quick ]; then
  shift
  bash scripts/setup_envs.sh client
  exec .venv/bin/python -m pytest tests/unit tests/server/test_v1.py "$@"
fi
bash scripts/setup_envs.sh all
# compiled once here, not by each of the first processes at once on a fresh clone
.venv/bin/python -m compileall -q -j 0 protocol server client > /dev/null
exec .venv/bin/python -m pytest -n 3 --dist loadgroup "$@"
