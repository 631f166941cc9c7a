#!/usr/bin/env bash
# Build the client environment if needed, then run the demo on the synthetic source.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_envs.sh client
exec .venv/bin/python scripts/demo.py "$@"
