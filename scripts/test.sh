#!/usr/bin/env bash
# README command 2: set up and run the test suite (pytest arguments pass through, e.g. -m quick).
# Each test module runs in its own pytest process unless the arguments name test paths: in one
# process holding the whole suite, XLA:CPU's compiler has segfaulted after ~400 tests (2 of 4 full
# runs, always compiling tests/train/test_train.py's last train step; never with the module on its
# own), which would take every later module's result with it.
# Modules run TEST_JOBS at a time (default: the CPU count, at most 4; the tests compile more than
# they compute, so two lanes on two cores nearly halve the wall time), the folders with the
# longest modules first; each module's output is printed when it ends, then a timing table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for a in "$@"; do
  case "$a" in tests*|./tests*|*.py|*::*) exec .venv/bin/python -m pytest "$@" ;; esac
done
jobs_max=${TEST_JOBS:-$(nproc)}
[ "$jobs_max" -gt 4 ] && jobs_max=4
modules=()
for d in compile e2e train mitigations kernels ssd; do
  modules+=($(find "tests/$d" -name "test_*.py" | sort))
done
for f in $(find tests -name "test_*.py" | sort); do
  case " ${modules[*]} " in *" $f "*) ;; *) modules+=("$f") ;; esac
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One XLA compilation cache for the run's modules and the binaries they start (tests/paths.py):
# what several tests compile alike compiles once.
export MAMBA2_JAX_TEST_XLA_CACHE=$tmp/xla-cache

run_one() {
  local f=$1 log start rc=0
  shift
  log=$tmp/$(echo "$f" | tr / _)
  start=$SECONDS
  .venv/bin/python -m pytest -q "$@" "$f" >"$log.out" 2>&1 || rc=$?
  echo "$rc $((SECONDS - start)) $f" >"$log.rc"
  flock "$tmp/lock" sh -c "echo '== $f (exit $rc, $((SECONDS - start)) s)'; cat '$log.out'"
}

start=$SECONDS
for f in "${modules[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  run_one "$f" "$@" &
done
wait
failed=()
echo "== test.sh: seconds per module ($jobs_max at a time, $((SECONDS - start)) s wall)"
for r in "$tmp"/*.rc; do
  read -r rc secs f <"$r"
  printf '%6s  %s\n' "$secs" "$f"
done | sort -rn
for r in "$tmp"/*.rc; do
  read -r rc secs f <"$r"
  # 5: every test of the module deselected (e.g. by -m)
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed+=("$f (exit $rc)"); fi
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'test.sh: FAILED modules:\n'
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "test.sh: every module passed"
