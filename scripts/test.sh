#!/usr/bin/env bash
# Build both environments if needed (scripts/setup_envs.sh), then run every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k legacy
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_envs.sh all
exec .venv/bin/python -m pytest "$@"
