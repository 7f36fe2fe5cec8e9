#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and the pinned packages (requirements.txt, constrained by
# requirements-lock.txt). Idempotent: re-running only installs what changed.
# Override the interpreter with PYTHON=/path/to/python3.12.
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
  # pyenv installs that are not on PATH as python3.12 shims
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -rV); do
      echo "env PYENV_VERSION=$v python3"; return 0
    done
  fi
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
