#!/usr/bin/env bash
# Creates .venv-cuda: Python >= 3.12 + jax[cuda13] (the CUDA plugin and CUDA wheels, about 1 minute,
# about 4.4 GB), used only for the ahead-of-time (deviceless) H100 compile checks of the Pallas/Triton
# GPU kernels on a CPU host:
#   JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-cuda/bin/python -m pallas_kernels.ssd_gpu.compile_check
#   .venv/bin/python -m pytest -m cuda_compile
# Idempotent: re-running only installs what changed. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_venv .venv-cuda setup_cuda_venv
install_pinned .venv-cuda scripts/requirements-cuda.txt -- -r scripts/requirements-cuda.txt
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-cuda/bin/python -c \
  'import jax, jax_plugins.xla_cuda13; print("setup_cuda_venv: jax", jax.__version__, "cuda13 plugin ok")' 2>/dev/null
