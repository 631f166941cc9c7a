#!/usr/bin/env bash
# The demo on the synthetic source: builds .venv with what it needs (torch, tqdm) the first
# time only, then shows frames/s as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_envs.sh demo
PYTHONUNBUFFERED=1 exec .venv/bin/python scripts/demo.py "$@"
