#!/usr/bin/env bash
# Creates .venv-torch: Python 3.11 + the CPU torch build + HF transformers, used only to
# regenerate golden fixtures (tests/fixtures/) and to run the HF peer in benchmarks/.
# The main project never imports torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY311=""
for c in python3.11 "env PYENV_VERSION=3.11.7 python3"; do
  if $c -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then PY311="$c"; break; fi
done
[ -n "$PY311" ] || { echo "setup_torch_venv: need a Python 3.11 interpreter (torch==2.13.0 CPU build)" >&2; exit 1; }
[ -x .venv-torch/bin/python ] || $PY311 -m venv .venv-torch
.venv-torch/bin/pip install -q --upgrade pip
.venv-torch/bin/pip install -q -r scripts/requirements-torch.txt
