"""Shared pytest set-up."""

import sys

from absl import flags

# grain's mp_prefetch reads an absl flag; outside absl.app.run that raises UnparsedFlagAccessError
# (google/grain#1355, fixed after grain 0.2.18). Parse the flags once with defaults only.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import os  # noqa: E402

from tests.paths import CACHE_MIN_SECONDS, TEST_XLA_FLAGS, XLA_CACHE  # noqa: E402

# XLA flags are read when the backend starts (tests/paths.py says why these).
if TEST_XLA_FLAGS:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# Sharding tests need several devices: 8 simulated CPU devices (before any backend starts).
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

if XLA_CACHE:  # one compilation cache per scripts/test.sh run (tests/paths.py)
  jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(CACHE_MIN_SECONDS))

AREAS = (
  "ssd",
  "kernels",
  "compile",
  "model",
  "checkpoints",
  "mitigations",
  "data",
  "train",
  "eval",
  "sweep",
  "e2e",
  "house",
)


# Not in the quick run (`-m quick`, under 5 minutes on a 2-core CPU): end-to-end processes, the
# ahead-of-time compile checks, tests marked slow, and the modules that take over 40 s each
# (measured 2026-12-06, `bash scripts/test.sh` prints the seconds per module): the numerics of
# the SSD, the kernels, the mitigated model and the sharded train steps run in the full suite.
NOT_QUICK = ("slow", "e2e", "compile")
NOT_QUICK_MODULES = {
  "tests/train/test_train.py",
  "tests/train/test_context_parallel.py",
  "tests/kernels/test_pallas_gpu.py",
  "tests/kernels/test_pallas_tpu.py",
  "tests/kernels/test_ssd_audit.py",
  "tests/mitigations/test_mitigated_model.py",
  "tests/mitigations/test_window.py",
  "tests/mitigations/test_rri_dt_scale.py",
  "tests/mitigations/test_state_norm.py",
  "tests/ssd/test_ssd.py",
  "tests/ssd/test_ssd_sharded.py",
  "tests/ssd/test_ssd_production.py",
  "tests/ssd/test_ssd_context.py",
  "tests/model/test_model.py",
  "tests/model/test_loss.py",
  "tests/model/test_remat_group.py",  # 37 s CPU (86 s wall on a loaded 2-core host)
  "tests/eval/test_eval_state_stats.py",
  "tests/eval/test_eval_streaming.py",
  "tests/eval/test_eval_ppl.py",
  "tests/eval/test_eval_passkey.py",
  "tests/sweep/test_sweep_ray.py",  # 36-40 s, 10-15 of them starting Ray (2026-12-06)
}


def pytest_collection_modifyitems(config, items):
  """Every test carries the marker of its folder (its room: `-m kernels`, `-m "not e2e"`), and
  `quick` unless it is slow, end-to-end, a compile check or in one of NOT_QUICK_MODULES."""
  import pytest

  for item in items:
    rel = item.path.relative_to(config.rootpath)
    parts = rel.parts
    if len(parts) > 2 and parts[0] == "tests" and parts[1] in AREAS:
      item.add_marker(getattr(pytest.mark, parts[1]))
    heavy = rel.as_posix() in NOT_QUICK_MODULES
    if not heavy and not any(item.get_closest_marker(m) for m in NOT_QUICK):
      item.add_marker(pytest.mark.quick)
