"""Shared pytest set-up."""

import sys

from absl import flags

# grain's mp_prefetch reads an absl flag; outside absl.app.run that raises UnparsedFlagAccessError
# (google/grain#1355, fixed after grain 0.2.18). Parse the flags once with defaults only.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

# Sharding tests need several devices: 8 simulated CPU devices (before any backend starts).
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from tests.paths import CACHE_MIN_SECONDS, XLA_CACHE  # noqa: E402

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


# Not in the quick run (`-m quick`): end-to-end processes, the ahead-of-time compile checks and
# tests marked slow.
NOT_QUICK = ("slow", "e2e", "compile")


def pytest_collection_modifyitems(config, items):
  """Every test carries the marker of its folder (its room: `-m kernels`, `-m "not e2e"`), and
  `quick` unless it is slow, end-to-end or a compile check."""
  import pytest

  for item in items:
    parts = item.path.relative_to(config.rootpath).parts
    if len(parts) > 2 and parts[0] == "tests" and parts[1] in AREAS:
      item.add_marker(getattr(pytest.mark, parts[1]))
    if not any(item.get_closest_marker(m) for m in NOT_QUICK):
      item.add_marker(pytest.mark.quick)
