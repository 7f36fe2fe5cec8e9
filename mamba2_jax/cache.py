"""Recurrent inference cache of a Mamba-2 model: conv context + SSM state per layer."""

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
  """

  conv_x: jax.Array
  conv_B: jax.Array
  conv_C: jax.Array
  ssm: jax.Array

  @classmethod
  def zeros(cls, config: Mamba2Config, batch: int) -> "Mamba2Cache":
    c, k = config, config.d_conv - 1
    gn = c.ngroups * c.d_state
    dt = c.compute_dtype
    return cls(
        conv_x=jnp.zeros((c.n_layer, batch, k, c.d_inner), dt),
        conv_B=jnp.zeros((c.n_layer, batch, k, gn), dt),
        conv_C=jnp.zeros((c.n_layer, batch, k, gn), dt),
        ssm=jnp.zeros((c.n_layer, batch, c.nheads, c.headdim, c.d_state), jnp.float32),
    )

  def conv_state(self) -> jax.Array:
    """Official layout of the conv cache: (n_layer, b, conv_dim, d_conv-1), channels [x|B|C]."""
    return jnp.swapaxes(jnp.concatenate([self.conv_x, self.conv_B, self.conv_C], -1), -1, -2)
