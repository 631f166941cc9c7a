#!/usr/bin/env bash
# Build the two environments psana-ipc is about, idempotently:
#   .venv        the user's side: torch (CPU), the client SDK, test tools; no psana
#   .venv-psana  the psana side: psana from PyPI, the server; no torch
#   demo         .venv with only what scripts/demo.py needs (torch, tqdm), once
# Usage: scripts/setup_envs.sh [client|psana|all|demo]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PSANA_IPC_PYTHON:-python3.11}
what=${1:-all}

pip_quiet() { "$@" --disable-pip-version-check -q; }

client_env() {  # $1: the extras to install
  if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
  # torch first and pinned: an unpinned torch pulls the CUDA build
  .venv/bin/python -c "import torch" 2>/dev/null || pip_quiet .venv/bin/pip install torch==2.13.0
  pip_quiet .venv/bin/pip install -e ".[$1]"
}

demo_env() {  # nothing to do when the demo's imports already work
  .venv/bin/python -c "import torch, tqdm, psana_ipc.client, psana_ipc.server" 2>/dev/null \
    || client_env torch
}

psana_env() {
  # pykerberos (a psana dependency) builds against Kerberos headers
  if ! dpkg -s libkrb5-dev >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libkrb5-dev
    else
      echo "psana needs Debian's libkrb5-dev: run 'sudo apt-get install libkrb5-dev'" >&2; exit 1
    fi
  fi
  if [ ! -x .venv-psana/bin/python ]; then "$PY" -m venv .venv-psana; fi
  .venv-psana/bin/python -c "import psana" 2>/dev/null \
    || pip_quiet .venv-psana/bin/pip install psana==4.3.4 mpich
  pip_quiet .venv-psana/bin/pip install --no-deps -e .
}

case "$what" in
  client) client_env torch,test ;;
  psana) psana_env ;;
  all) client_env torch,test; psana_env ;;
  demo) demo_env ;;
  *) echo "usage: $0 [client|psana|all|demo]" >&2; exit 2 ;;
esac
