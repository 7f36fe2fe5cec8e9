#!/usr/bin/env bash
# Creates the isolated virtual environments for the peer benchmarks (idempotent; safe to re-run).
#   .venv-torch             Python 3.11 + torch 2.13.0 CPU + transformers 5.23.0
#                           (delegates to scripts/setup_torch_venv.sh; used by hf_torch_peer.py)
#   .venv-peer-mamba2jax    Python 3.12 + mamba2-jax==1.1.2 and its pinned deps
#                           (benchmarks/peers/requirements-mamba2jax.txt; used by mamba2_jax_peer.py)
# Usage: bash benchmarks/peers/setup_peers.sh [torch|mamba2jax|all]   (default: all)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WHAT="${1:-all}"

setup_torch() {
  echo "[setup_peers] .venv-torch (HF transformers, torch CPU) via scripts/setup_torch_venv.sh"
  bash scripts/setup_torch_venv.sh
}

find_py312() {
  local c
  for c in python3.12 "env PYENV_VERSION=3.12.1 python3"; do
    if $c -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

setup_mamba2jax() {
  local venv=.venv-peer-mamba2jax req=benchmarks/peers/requirements-mamba2jax.txt
  echo "[setup_peers] $venv (PyPI mamba2-jax 1.1.2, pinned in $req)"
  if [ ! -x "$venv/bin/python" ]; then
    local py
    py="$(find_py312)" || {
      echo "setup_peers: need a Python 3.12 interpreter for $venv (tried 'python3.12' on PATH and" \
           "'PYENV_VERSION=3.12.1 python3'); install Python 3.12 and re-run" >&2
      exit 1
    }
    $py -m venv "$venv"
  fi
  "$venv/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || {
    echo "setup_peers: $venv exists but is not Python 3.12; remove it and re-run" >&2; exit 1; }
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$req"
  "$venv/bin/python" -I -c 'import mamba2_jax, jax, flax; print("[setup_peers] mamba2_jax", mamba2_jax.__version__, "jax", jax.__version__, "flax", flax.__version__)'
}

case "$WHAT" in
  torch) setup_torch ;;
  mamba2jax) setup_mamba2jax ;;
  all) setup_torch; setup_mamba2jax ;;
  *) echo "usage: $0 [torch|mamba2jax|all]" >&2; exit 2 ;;
esac
