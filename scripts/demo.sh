#!/usr/bin/env bash
# README command 1: set up, then reproduce state collapse on CPU (about 12 minutes): train two
# small Mamba-2 models on the synthetic copy task at training lengths 64 and 256, evaluate each
# 32-128x beyond its training length with and without the paper's mitigations, write the report.
# Extra arguments go to experiments.sweep (e.g. --config=configs/sweeps/demo.py:quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR=${DEMO_WORKDIR:-runs/demo}
.venv/bin/python -m experiments.sweep --config=configs/sweeps/demo.py --workdir="$WORKDIR" "$@"
.venv/bin/python -m experiments.report --sweep="$WORKDIR"
echo "demo: open $WORKDIR/report/report.md (tables and plots)"
