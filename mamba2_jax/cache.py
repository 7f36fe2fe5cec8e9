"""Recurrent inference cache of a Mamba-2 model: conv context + SSM state per layer.

The mitigation fields (see mamba2_jax/mitigations/) exist only when the config enables
them, so the default cache (and every pytree built from it) is unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mamba2_jax.config import Mamba2Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mamba2Cache:
  """State after the last token seen. With a leading layer axis in the model's cache.

  conv_x: (n_layer, b, d_conv-1, d_inner)  last d_conv-1 pre-conv x inputs (compute dtype)
  conv_B: (n_layer, b, d_conv-1, ngroups*d_state)
  conv_C: (n_layer, b, d_conv-1, ngroups*d_state)
  ssm:    (n_layer, b, nheads, headdim, d_state) SSM state h, float32

  Only with `ssd_window` (r) or `state_norm` on (None otherwise):
  pos:     (n_layer,) int32  tokens seen so far (ring slot / state-norm block phase)
  Only with `ssd_window = r > 0` (ring buffer of the last r steps, position p in slot p % r):
  win_dt:  (n_layer, b, r, nheads) float32  processed dt (after softplus, clip and dt_scale)
  win_x:   (n_layer, b, r, nheads, headdim) x after conv + SiLU (compute dtype)
  win_B:   (n_layer, b, r, ngroups, d_state) B after conv + SiLU + rri_insert_scale
  win_h:   (n_layer, b, nheads, headdim, d_state) float32  delayed state h_{pos-1-r}
  win_sum: (n_layer, b, nheads) float32  sum of win_dt (running; re-summed at each prefill)
  """

  conv_x: jax.Array
  conv_B: jax.Array
  conv_C: jax.Array
  ssm: jax.Array
  pos: jax.Array | None = None
  win_dt: jax.Array | None = None
  win_x: jax.Array | None = None
  win_B: jax.Array | None = None
  win_h: jax.Array | None = None
  win_sum: jax.Array | None = None

  @classmethod
  def zeros(cls, config: Mamba2Config, batch: int) -> "Mamba2Cache":
    c, k = config, config.d_conv - 1
    gn = c.ngroups * c.d_state
    dt = c.compute_dtype
    f32 = jnp.float32
    nl, h, p, n = c.n_layer, c.nheads, c.headdim, c.d_state
    extra = {}
    if c.ssd_window > 0 or c.state_norm != "off":
      extra["pos"] = jnp.zeros((nl,), jnp.int32)
    if c.ssd_window > 0:
      r = c.ssd_window
      extra.update(
        win_dt=jnp.zeros((nl, batch, r, h), f32),
        win_x=jnp.zeros((nl, batch, r, h, p), dt),
        win_B=jnp.zeros((nl, batch, r, c.ngroups, n), dt),
        win_h=jnp.zeros((nl, batch, h, p, n), f32),
        win_sum=jnp.zeros((nl, batch, h), f32),
      )
    return cls(
      conv_x=jnp.zeros((nl, batch, k, c.d_inner), dt),
      conv_B=jnp.zeros((nl, batch, k, gn), dt),
      conv_C=jnp.zeros((nl, batch, k, gn), dt),
      ssm=jnp.zeros((nl, batch, h, p, n), f32),
      **extra,
    )

  def conv_state(self) -> jax.Array:
    """Official layout of the conv cache: (n_layer, b, conv_dim, d_conv-1), channels [x|B|C]."""
    return jnp.swapaxes(jnp.concatenate([self.conv_x, self.conv_B, self.conv_C], -1), -1, -2)
