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
has_module() {  # has_module VENV MODULE: installed there (found, not imported: torch takes seconds)
  "$1/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$2') is None)"
}

# A stamp beside a venv: the pyproject.toml it installed this project from, with these
# extras. Installs are editable, so only a changed pyproject.toml needs pip again.
stamp_of() { echo "$1/.psana-ipc-installed-$2"; }
up_to_date() {  # up_to_date VENV EXTRAS
  cmp -s pyproject.toml "$(stamp_of "$1" "$2")" && "$1/bin/python" -c "import psana_ipc" 2>/dev/null
}
install_project() {  # install_project VENV EXTRAS PIP-ARGS...: pip install -e unless up to date
  local venv=$1 extras=$2
  shift 2
  up_to_date "$venv" "$extras" && return 0
  pip_quiet "$venv/bin/pip" install "$@"
  cp pyproject.toml "$(stamp_of "$venv" "$extras")"
}

debian_package() {  # debian_package PACKAGE WHY: install it as root, else say how
  dpkg -s "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1"
  else
    echo "$2: run 'sudo apt-get install $1'" >&2
    return 1
  fi
}

client_env() {  # $1: the extras to install
  if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
  # torch first and pinned: an unpinned torch pulls the CUDA build
  has_module .venv torch || pip_quiet .venv/bin/pip install torch==2.13.0
  install_project .venv "$1" -e ".[$1]"
}

client_test_env() {
  client_env torch,test
  debian_package shellcheck "the tests check the SLURM job script with shellcheck" || true
  debian_package iproute2 "the tests put servers on other hosts with network namespaces" || true
}

demo_env() {  # nothing to do when the demo's imports already work
  .venv/bin/python -c "import torch, tqdm, psana_ipc.client, psana_ipc.server" 2>/dev/null \
    || client_env torch
}

psana_env() {
  # pykerberos (a psana dependency) builds against Kerberos headers
  debian_package libkrb5-dev "psana needs Debian's libkrb5-dev" || exit 1
  if [ ! -x .venv-psana/bin/python ]; then "$PY" -m venv .venv-psana; fi
  has_module .venv-psana psana || pip_quiet .venv-psana/bin/pip install psana==4.3.4 mpich
  install_project .venv-psana server --no-deps -e .
}

case "$what" in
  client) client_test_env ;;
  psana) psana_env ;;
  all) client_test_env; psana_env ;;
  demo) demo_env ;;
  *) echo "usage: $0 [client|psana|all|demo]" >&2; exit 2 ;;
esac
