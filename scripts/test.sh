#!/usr/bin/env bash
# README command 2: set up and run the test suite (pytest arguments pass through, e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
