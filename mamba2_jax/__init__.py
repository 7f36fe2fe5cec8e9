"""mamba2_jax: a JAX/Flax NNX Mamba-2 for long-context research (Stuffed Mamba toolkit).

Top-level names are imported lazily, so light submodules (e.g. the data package in worker
processes) start without importing jax and flax.
"""

import importlib

_EXPORTS = {
  "ConfigError": "mamba2_jax.config",
  "Mamba2Config": "mamba2_jax.config",
  "Mamba2Cache": "mamba2_jax.cache",
  "Mamba2LM": "mamba2_jax.model",
  "from_pretrained": "mamba2_jax.checkpoints.hub",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'mamba2_jax' has no attribute {name!r}")
