"""`with_mitigations`: a model with other mitigation fields and the same parameters."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mamba2_jax.model import Mamba2LM

from .presets import preset_fields
from .state_norm import StateNormThreshold

__all__ = ["with_mitigations"]


def with_mitigations(model: Mamba2LM, preset: str | None = None, **config_fields) -> Mamba2LM:
  """A Mamba2LM with `model.config.replace(**config_fields)` and the same parameter arrays.

  Parameters are shared, not copied. `preset`: start from `preset_fields(preset)` (every
  mitigation field reset) before applying `config_fields`. State-norm thresholds: kept from
  `model` when it has them and `state_norm_threshold` is not given, else filled with the
  (new) `state_norm_threshold`. The default config creates no threshold variable.
  """
  fields = dict(config_fields)
  if preset is not None:
    fields = preset_fields(preset, **fields)
  config = model.config.replace(**fields)
  abstract = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  old = dict(nnx.to_flat_state(nnx.state(model)))
  refill = "state_norm_threshold" in fields
  for path, var in nnx.to_flat_state(state):
    if path in old and not (refill and isinstance(var, StateNormThreshold)):
      value = old[path].get_value()
    elif isinstance(var, StateNormThreshold):
      value = jnp.full(var.shape, config.state_norm_threshold, var.dtype)
    else:
      raise ValueError(
        f"with_mitigations: {'/'.join(map(str, path))} missing from the model "
        "(only mitigation fields may change the variables)"
      )
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(
        f"with_mitigations: {'/'.join(map(str, path))} has shape {value.shape}, "
        f"the new config needs {var.shape} (change only mitigation fields)"
      )
    var.set_value(value)
  return nnx.merge(graphdef, state)
