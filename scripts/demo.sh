#!/usr/bin/env bash
# README command 1: set up, then reproduce state collapse on CPU (about 10 minutes): train two
# small Mamba-2 models on the synthetic copy task at training lengths 64 and 256, evaluate each
# 32-128x beyond its training length with and without the paper's mitigations, write the report.
#   bash scripts/demo.sh                       # the CPU demo -> runs/demo/report/report.md
#   bash scripts/demo.sh --full data=D,ckpts=C # the paper's state-capacity sweep at scale, on an
#                                              # accelerator pod (every host runs this command)
# Other extra arguments go to experiments.sweep (e.g. --config=configs/sweeps/demo.py:quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=configs/sweeps/demo.py
WORKDIR=${DEMO_WORKDIR:-runs/demo}
if [ "${1:-}" = "--full" ]; then
  shift
  OPTS=""
  if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OPTS=",$1"; shift; fi
  CONFIG="configs/sweeps/state_capacity.py:paper$OPTS"
  WORKDIR=${DEMO_WORKDIR:-runs/paper}
fi
.venv/bin/python -m experiments.sweep --config="$CONFIG" --workdir="$WORKDIR" "$@"
.venv/bin/python -m experiments.report --sweep="$WORKDIR"
echo "demo: open $WORKDIR/report/report.md (tables and plots)"
