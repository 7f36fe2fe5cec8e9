"""Layer internals of a Mamba2LM (x, B, C, dt, z per layer) without changing the model code.

`forward_with_internals(model, tokens, cache)` runs the stacked layers one by one under
`lax.scan` like `Mamba2LM._scan_layers`: each layer's parameters are a slice of
`nnx.split(model.layers)`, merged into a `Mamba2Block`, and the layer output and new cache come
from the block's own `__call__` (so propagation is exactly the model's). The internals are
recomputed beside it from the mixer's own pieces (`Mamba2Mixer._project`, `causal_conv` with the
layer's conv context from the cache, SiLU, `prepare_dt`); tests/test_eval_state_stats.py checks
them against the model (the SSD of the recomputed x, B, C, dt reproduces the block's output and
new SSM state), so they cannot silently drift from the mixer.

Mitigations (mamba2_jax/mitigations.py) enter through the mixer's own helpers
(`_processed_dt`: dt *= dt_scale; `_scale_B`: B *= rri_insert_scale; `_log_decay_offset`:
log alpha += log rri_decay_scale), so x, B, dt and `log_decay` are what the SSM consumes; a
mixer without them (no mitigation support) gets the plain formulas. The sliding window and the
state normalization act inside the SSM; their effect shows in the cached state only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.cache import Mamba2Cache
from mamba2_jax.layers import causal_conv, rms_norm
from mamba2_jax.ssd import prepare_dt


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


def _processed_dt(mixer, dt_raw):
  if hasattr(mixer, "_processed_dt"):
    return mixer._processed_dt(dt_raw)  # pylint: disable=protected-access
  return prepare_dt(
    dt_raw, mixer.dt_bias[...], dt_softplus=True, dt_limit=mixer.config.dt_limit, dtype=jnp.float32
  )


def _scaled_B(mixer, B):
  return mixer._scale_B(B) if hasattr(mixer, "_scale_B") else B  # pylint: disable=protected-access


def _log_decay_offset(mixer) -> float:
  if hasattr(mixer, "_log_decay_offset"):
    return float(mixer._log_decay_offset())  # pylint: disable=protected-access
  return 0.0


def block_internals(block, residual: jax.Array, layer_cache: Mamba2Cache):
  """One block: residual (b, c, d_model), per-layer cache -> (residual, cache, Internals of the
  layer without the leading layer axis)."""
  cfg = block.config
  mixer = block.mixer
  b, c, _ = residual.shape
  u = rms_norm(residual, block.norm[...], cfg.norm_eps, cfg.compute_dtype)
  z, xr, Br, Cr, dt_raw = mixer._project(u)  # pylint: disable=protected-access
  opt = mixer._opt  # pylint: disable=protected-access
  x, _ = causal_conv(xr, mixer.conv_x[...], opt("conv_x_bias"), context=layer_cache.conv_x)
  B, _ = causal_conv(Br, mixer.conv_B[...], opt("conv_B_bias"), context=layer_cache.conv_B)
  C, _ = causal_conv(Cr, mixer.conv_C[...], opt("conv_C_bias"), context=layer_cache.conv_C)
  x, B, C = jax.nn.silu(x), _scaled_B(mixer, jax.nn.silu(B)), jax.nn.silu(C)
  dt = _processed_dt(mixer, dt_raw)
  A = -jnp.exp(mixer.A_log[...].astype(jnp.float32))
  offset = _log_decay_offset(mixer)
  log_decay = dt * A if offset == 0.0 else dt * A + jnp.float32(offset)
  new_residual, new_cache = block(residual, cache=layer_cache)
  internals = Internals(
    x=x.reshape(b, c, cfg.nheads, cfg.headdim),
    B=B.reshape(b, c, cfg.ngroups, cfg.d_state),
    C=C.reshape(b, c, cfg.ngroups, cfg.d_state),
    dt=dt,
    z=z,
    log_decay=log_decay,
  )
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
