#!/usr/bin/env bash
# Creates .venv-cuda: Python >= 3.12 + jax[cuda13] (the CUDA plugin and CUDA wheels, about 1 minute,
# about 4.4 GB), used only for the ahead-of-time (deviceless) H100 compile checks of the Pallas/Triton
# GPU kernels on a CPU host:
#   JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-cuda/bin/python -m pallas_kernels.ssd_gpu.compile_check
#   .venv/bin/python -m pytest -m cuda_compile
# Idempotent: re-running only installs what changed. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -rV); do
      echo "env PYENV_VERSION=$v python3"; return 0
    done
  fi
  return 1
}

if [ ! -x .venv-cuda/bin/python ]; then
  PY=$(find_python) || {
    echo "setup_cuda_venv: needs Python >= 3.12 on PATH or in pyenv (or PYTHON=/path/to/python3.12)" >&2
    exit 1
  }
  echo "setup_cuda_venv: creating .venv-cuda with $($PY --version 2>&1) ($PY)"
  $PY -m venv .venv-cuda
fi
stamp=.venv-cuda/.installed-$(sha256sum scripts/requirements-cuda.txt | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv-cuda/bin/python -m pip install -q --upgrade pip
  .venv-cuda/bin/python -m pip install -q -r scripts/requirements-cuda.txt
  rm -f .venv-cuda/.installed-*; touch "$stamp"
fi
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-cuda/bin/python -c \
  'import jax, jax_plugins.xla_cuda13; print("setup_cuda_venv: jax", jax.__version__, "cuda13 plugin ok")' 2>/dev/null
