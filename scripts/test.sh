#!/usr/bin/env bash
# README command 2: set up and run the test suite (pytest arguments pass through, e.g. -m "not slow").
# Each test module runs in its own pytest process unless the arguments name test paths: in one
# process holding the whole suite, XLA:CPU's compiler has segfaulted after ~400 tests (2 of 4 full
# runs, always compiling tests/test_train.py's last train step; never with the module on its own),
# which would take every later module's result with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for a in "$@"; do
  case "$a" in tests*|./tests*|*.py|*::*) exec .venv/bin/python -m pytest "$@" ;; esac
done
failed=()
for f in $(find tests -name "test_*.py" | sort); do
  echo "== $f"
  rc=0
  .venv/bin/python -m pytest -q "$@" "$f" || rc=$?
  # 5: every test of the module deselected (e.g. by -m)
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed+=("$f (exit $rc)"); fi
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'test.sh: FAILED modules:\n'; printf '  %s\n' "${failed[@]}"; exit 1
fi
echo "test.sh: every module passed"
