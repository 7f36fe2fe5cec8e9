#!/usr/bin/env bash
# The house style, checked in seconds: `ruff format` (2-space indents) and `ruff check`, both
# configured in pyproject.toml. `bash scripts/lint.sh --fix` rewrites the files instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff format . && .venv/bin/ruff check --fix .
else
  .venv/bin/ruff format --check . && .venv/bin/ruff check .
fi
