"""Paths the tests share (the repository root, the committed fixtures) and the environment of
the subprocesses they start."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# scripts/test.sh points every module of one run at one XLA compilation cache (a fresh folder
# per run, deleted at its end), so the programs that several tests and subprocesses compile
# alike (the tiny models' train steps, a resumed run's step) compile once per run.
XLA_CACHE = os.environ.get("MAMBA2_JAX_TEST_XLA_CACHE")
CACHE_MIN_SECONDS = "0.3"

# The tests compile far more than they compute, and XLA:CPU spends most of a compile in LLVM's
# optimisation passes: without them (`--xla_backend_optimization_level=0`) the tests' compiles
# take about half the CPU time (tests/model/test_model.py's three slowest tests: 74 s -> 39 s of
# CPU) while the numerics stay IEEE fp32 (no fast-math either way). Benchmarks and binaries run
# outside the tests keep XLA's defaults.
TEST_XLA_FLAGS = os.environ.get(
  "MAMBA2_JAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0"
).strip()


def cpu_env(devices: int | None = None) -> dict:
  """The environment of a binary run by a test: the caller's, without its XLA_/JAX_ settings,
  on the CPU (with `devices` simulated devices), importing this checkout, sharing the run's
  compilation cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  if TEST_XLA_FLAGS:
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
  if devices is not None:
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
  if XLA_CACHE:
    env.update(
      JAX_COMPILATION_CACHE_DIR=XLA_CACHE,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=CACHE_MIN_SECONDS,
    )
  return env
