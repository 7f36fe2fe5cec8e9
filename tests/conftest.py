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
