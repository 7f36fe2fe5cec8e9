"""SSD (state-space duality) scan for Mamba-2: `ssd` is the one entry, with or without a mesh.

api        `ssd(..., impl=...)` and the impl registry ('reference', 'xla', 'pallas_gpu',
           'pallas_tpu'; the Pallas cores live in the top-level `pallas_kernels`)
common     the shared prologue (dt processing, segment runs, argument checks)
reference  the per-token oracle scan and `recurrence_step`, the one per-token recurrence
chunked    the chunked XLA path; window.py its sliding-window correction
sharded    `sharded_ssd`: an impl per shard under `jax.shard_map` (Pallas impls under a mesh)
platform   the target being compiled for (impl="auto", interpret mode, TPU core split)
"""

from .api import (
  available_impls,
  register_impl,
  resolve_impl,
  set_auto_impl,
  ssd,
)
from .common import prepare_dt

__all__ = [
  "ssd",
  "prepare_dt",
  "register_impl",
  "set_auto_impl",
  "available_impls",
  "resolve_impl",
]
