#!/usr/bin/env bash
# Build the two environments psana-ipc is about, idempotently:
#   .venv        the user's side: torch (CPU), the client SDK, test tools; no psana
#   .venv-psana  the psana side: psana from PyPI, the server; no torch
# Usage: scripts/setup_envs.sh [client|psana|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PSANA_IPC_PYTHON:-python3.11}
what=${1:-all}

pip_quiet() { "$@" --disable-pip-version-check -q; }

debian_package() {  # debian_package PACKAGE WHY: install it as root, else say how
  dpkg -s "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1"
  else
    echo "$2: run 'sudo apt-get install $1'" >&2
    return 1
  fi
}

client_env() {
  if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
  # torch first and pinned: an unpinned torch pulls the CUDA build
  .venv/bin/python -c "import torch" 2>/dev/null || pip_quiet .venv/bin/pip install torch==2.13.0
  pip_quiet .venv/bin/pip install -e ".[torch,test]"
  debian_package shellcheck "the tests check the SLURM job script with shellcheck" || true
}

psana_env() {
  # pykerberos (a psana dependency) builds against Kerberos headers
  debian_package libkrb5-dev "psana needs Debian's libkrb5-dev" || exit 1
  if [ ! -x .venv-psana/bin/python ]; then "$PY" -m venv .venv-psana; fi
  .venv-psana/bin/python -c "import psana" 2>/dev/null \
    || pip_quiet .venv-psana/bin/pip install psana==4.3.4 mpich
  pip_quiet .venv-psana/bin/pip install --no-deps -e .
}

case "$what" in
  client) client_env ;;
  psana) psana_env ;;
  all) client_env; psana_env ;;
  *) echo "usage: $0 [client|psana|all]" >&2; exit 2 ;;
esac
