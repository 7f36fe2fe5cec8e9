#!/usr/bin/env bash
# README command 1: set up and run the demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m experiments.demo "$@"
