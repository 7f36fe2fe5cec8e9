#!/usr/bin/env bash
# Installs the optional Ray (requirements-ray.txt: `experiments.sweep --launcher=ray`) into .venv,
# constrained by requirements-lock.txt; creates .venv first (scripts/setup.sh) if it is missing.
# Idempotent: re-running installs only when the requirement files changed. A Ray cluster's
# nodes need the same: run this on each (docs/sweeps.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
stamp=".venv/.ray-$(cat requirements-ray.txt requirements-lock.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q -r requirements-ray.txt -c requirements-lock.txt
  rm -f .venv/.ray-*
  touch "$stamp"
fi
.venv/bin/python -c 'import ray; print("setup_ray: ray", ray.__version__)'
