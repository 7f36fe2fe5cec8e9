#!/usr/bin/env bash
# Creates .venv-tpu: Python >= 3.12, the project's requirements + jax[tpu] (libtpu from PyPI), used
# for the ahead-of-time TPU compiles on a CPU host (Mosaic kernels, the full train step):
#   .venv-tpu/bin/python -m pallas_kernels.ssd_tpu.compile_check
#   .venv-tpu/bin/python -m experiments.train_compile --config=configs/train.py:130m --topology=v5e:2x2
#   .venv/bin/python -m pytest -m tpu_compile
# Idempotent: re-running only installs what changed. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_venv .venv-tpu setup_tpu_venv
install_pinned .venv-tpu scripts/requirements-tpu.txt requirements.txt requirements-lock.txt -- \
  -r scripts/requirements-tpu.txt -c requirements-lock.txt
.venv-tpu/bin/python -c 'import jax, libtpu; print("setup_tpu_venv: jax", jax.__version__, "libtpu ok")' 2>/dev/null
