#!/usr/bin/env bash
# Creates .venv-tpu: Python >= 3.12, the project's requirements + jax[tpu] (libtpu from PyPI), used for the
# ahead-of-time TPU compiles on a CPU host (Mosaic kernels, the full train step):
#   .venv-tpu/bin/python -m pallas_kernels.ssd_tpu.compile_check
#   .venv/bin/python -m pytest -m tpu_compile
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

if [ ! -x .venv-tpu/bin/python ]; then
  PY=$(find_python) || {
    echo "setup_tpu_venv: needs Python >= 3.12 on PATH or in pyenv (or PYTHON=/path/to/python3.12)" >&2
    exit 1
  }
  echo "setup_tpu_venv: creating .venv-tpu with $($PY --version 2>&1) ($PY)"
  $PY -m venv .venv-tpu
fi
stamp=.venv-tpu/.installed-$(cat scripts/requirements-tpu.txt requirements.txt requirements-lock.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv-tpu/bin/python -m pip install -q --upgrade pip
  .venv-tpu/bin/python -m pip install -q -r scripts/requirements-tpu.txt -c requirements-lock.txt
  rm -f .venv-tpu/.installed-*; touch "$stamp"
fi
.venv-tpu/bin/python -c 'import jax, libtpu; print("setup_tpu_venv: jax", jax.__version__, "libtpu ok")' 2>/dev/null
