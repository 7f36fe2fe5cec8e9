"""Layer internals of a Mamba2LM (x, B, C, dt, z per layer) without changing the model code.

`forward_with_internals(model, tokens, cache)` runs the stacked layers one by one under
`lax.scan` like `Mamba2LM._scan_layers`: each layer's parameters are a slice of
`nnx.split(model.layers)`, merged into a `Mamba2Block`, and the layer output and new cache come
from the block's own `__call__` (so propagation is exactly the model's). The internals come
beside it from the mixer's public `ssm_inputs` (in_proj, causal conv with the layer's conv
context from the cache, SiLU), `processed_dt` and `log_decay`, the code the mixer itself runs;
tests/eval/test_eval_state_stats.py checks them against the model (the SSD of x, B, C, dt
reproduces the block's output and new SSM state).

Mitigations (mamba2_jax/mitigations/) enter through those mixer methods (dt *= dt_scale,
B *= rri_insert_scale, log alpha += log rri_decay_scale), so x, B, dt and `log_decay` are what
the SSM consumes. The sliding window and the state normalization act inside the SSM; their
effect shows in the cached state only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.layers import rms_norm


class Internals(NamedTuple):
  """Per-layer tensors of one chunk, stacked over layers (leading axis n_layer).

  x:  (n_layer, b, c, H, P)  SSM input after conv + SiLU (compute dtype)
  B:  (n_layer, b, c, G, N)  after conv + SiLU (and rri_insert_scale)
  C:  (n_layer, b, c, G, N)  after conv + SiLU
  dt: (n_layer, b, c, H)     float32, after bias + softplus + dt_limit (and dt_scale)
  z:  (n_layer, b, c, d_inner) gate input
  log_decay: (n_layer, b, c, H) float32, log alpha_t = dt * A (+ log rri_decay_scale)
  """

  x: jax.Array
  B: jax.Array
  C: jax.Array
  dt: jax.Array
  z: jax.Array
  log_decay: jax.Array


def block_internals(block, residual: jax.Array, layer_cache: Mamba2Cache):
  """One block: residual (b, c, d_model), per-layer cache -> (residual, cache, Internals of the
  layer without the leading layer axis)."""
  cfg = block.config
  mixer = block.mixer
  u = rms_norm(residual, block.norm[...], cfg.norm_eps, cfg.compute_dtype)
  inp = mixer.ssm_inputs(u, layer_cache)
  dt = mixer.processed_dt(inp.dt)
  new_residual, new_cache = block(residual, cache=layer_cache)
  internals = Internals(x=inp.x, B=inp.B, C=inp.C, dt=dt, z=inp.z, log_decay=mixer.log_decay(dt))
  return new_residual, new_cache, internals


def forward_with_internals(
  model, tokens: jax.Array, cache: Mamba2Cache | None = None, *, reduce=None
):
  """tokens (b, c) from `cache` -> (logits (b, c, V), new cache, per-layer outputs).

  Equals `model.prefill(tokens, cache)` in logits and cache. Per-layer outputs are the stacked
  `Internals`, or `reduce(internals, layer_cache_after)` per layer if given (e.g. statistics,
  so the full tensors never leave the layer scan).
  """
  if cache is None:
    cache = model.init_cache(tokens.shape[0])
  graphdef, state = nnx.split(model.layers)
  residual = model._embed(tokens)  # pylint: disable=protected-access

  def body(carry, xs):
    layer_state, layer_cache = xs
    block = nnx.merge(graphdef, layer_state)
    carry, new_cache, internals = block_internals(block, carry, layer_cache)
    out = internals if reduce is None else reduce(internals, new_cache)
    return carry, (new_cache, out)

  residual, (new_cache, outs) = jax.lax.scan(body, residual, (state, cache))
  h = model._final_norm(residual)  # pylint: disable=protected-access
  return model._logits(h), new_cache, outs  # pylint: disable=protected-access
