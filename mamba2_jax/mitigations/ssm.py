"""A layer's SSM with the configured mitigations: one call for a sequence, one for a token.

The mixer (mamba2_jax/mixer.py) computes the SSM inputs and calls `ssm_sequence` in the forward
and prefill, `ssm_step` in the decode step. Here the config's mitigation fields become op
arguments and cache updates:

  rri_insert_scale  B *= c_b before the op, in the compute dtype (`scale_B`, by the mixer's
                    `ssm_inputs`)
  dt_scale          dt *= s after softplus/clip (`processed_dt`; the op's ``dt_scale``)
  rri_decay_scale   log alpha += log c_a (`decay_offset`, `log_decay`; the op's
                    ``log_decay_offset``)
  ssd_window        the op's ``window``; across prefill pieces and decode steps window_cache.py
  state_norm        "token": the op's reference scan with `normalize_state` as state hook;
                    "chunk": `block_normalized_ssd` (mitigations/state_norm.py)

Imports the SSD op and the leaf modules of this package, never the model.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from mamba2_jax.ssd import prepare_dt, ssd
from mamba2_jax.ssd.common import expand_groups
from mamba2_jax.ssd.reference import recurrence_step

from .state_norm import block_normalized_ssd, normalize_state
from .window_cache import window_prefill, window_step

__all__ = [
  "decay_offset",
  "scale_B",
  "processed_dt",
  "log_decay",
  "ssm_sequence",
  "ssm_step",
]


def decay_offset(config) -> float:
  """log c_a of RRI (0.0 when off)."""
  ca = config.rri_decay_scale
  return 0.0 if ca == 1.0 else math.log(ca)


def scale_B(config, B):
  """B * c_b (RRI's insertion scale) in B's dtype."""
  cb = config.rri_insert_scale
  return B if cb == 1.0 else B * jnp.asarray(cb, B.dtype)


def processed_dt(config, dt, dt_bias):
  """Raw dt (..., H) -> float32 dt as the SSM consumes it: softplus(dt + dt_bias), clipped to
  config.dt_limit, times dt_scale."""
  dt = prepare_dt(dt, dt_bias, dt_softplus=True, dt_limit=config.dt_limit, dtype=jnp.float32)
  return dt if config.dt_scale == 1.0 else dt * jnp.float32(config.dt_scale)


def log_decay(config, dt, A):
  """log alpha = dt * A (+ log c_a) from processed dt (..., H) and A (H,)."""
  off = decay_offset(config)
  return dt * A if off == 0.0 else dt * A + jnp.float32(off)


def ssm_sequence(config, x, dt, A, B, C, *, D, dt_bias, tau=None, segment_ids=None, cache=None):
  """The SSD of one layer over a sequence with the configured mitigations.

  x (b,L,H,P), B, C (b,L,G,N) (B already scaled by `scale_B`), dt raw (b,L,H), A (H,), D (H,)
  or (H,P), dt_bias (H,); tau (H,): state-norm thresholds (state_norm on); cache: the layer's
  `Mamba2Cache` to continue from, or None (zero state, no final state).
  Returns (y (b,L,H,P), final state or None, dict of updated mitigation cache fields).
  """
  c = config
  off = decay_offset(c)
  h0 = None if cache is None else cache.ssm
  extra = {}
  if cache is not None and cache.pos is not None:
    extra["pos"] = cache.pos + x.shape[1]
  if c.state_norm == "token":
    y, h = ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      dt_limit=c.dt_limit,
      dt_scale=c.dt_scale,
      log_decay_offset=off,
      initial_state=h0,
      segment_ids=segment_ids,
      return_final_state=True,
      impl="reference",
      state_hook=functools.partial(normalize_state, tau=tau),
    )
  elif c.state_norm == "chunk":
    y, h = block_normalized_ssd(
      x,
      processed_dt(c, dt, dt_bias),
      A,
      B,
      C,
      tau=tau,
      block=c.state_norm_chunk,
      impl=c.ssd_impl,
      chunk_size=min(c.resolved_chunk_size(), c.state_norm_chunk),
      position=0 if cache is None else cache.pos,
      D=D,
      log_decay_offset=off,
      initial_state=h0,
      segment_ids=segment_ids,
    )
  elif c.ssd_window > 0 and cache is not None:
    y, h, extra = window_prefill(
      x,
      processed_dt(c, dt, dt_bias),
      A,
      B,
      C,
      cache,
      r=c.ssd_window,
      impl=c.ssd_impl,
      log_decay_offset=off,
      chunk_size=c.resolved_chunk_size(),
      D=D,
      segment_ids=segment_ids,
    )
  else:
    result = ssd(
      x,
      dt,
      A,
      B,
      C,
      D=D,
      dt_bias=dt_bias,
      initial_state=h0,
      segment_ids=segment_ids,
      impl=c.ssd_impl,
      dt_softplus=True,
      dt_limit=c.dt_limit,
      chunk_size=c.resolved_chunk_size(),
      return_final_state=cache is not None,
      dt_scale=c.dt_scale,
      log_decay_offset=off,
      window=c.ssd_window or None,
    )
    y, h = result if cache is not None else (result, None)
  return y, (h if cache is not None else None), extra


def ssm_step(config, x, dt, A, B, C, *, D, dt_bias, cache, tau=None):
  """One decode token of the layer's SSM with the configured mitigations. O(1) in the length.

  x (b,H,P), B, C (b,G,N) in the compute dtype (B already scaled by `scale_B`), dt raw (b,H);
  A, D, dt_bias, tau as in `ssm_sequence`; cache: the layer's `Mamba2Cache` before the token.
  Returns (y (b,H,P) float32 with the D skip, new SSM state, dict of updated mitigation cache
  fields).
  """
  c = config
  f32 = jnp.float32
  H = x.shape[1]
  xf = x.astype(f32)
  Bf, Cf = expand_groups(B.astype(f32), H), expand_groups(C.astype(f32), H)  # head h: h // rep
  dt = processed_dt(c, dt, dt_bias)  # (b, H)
  h = recurrence_step(cache.ssm, jnp.exp(log_decay(c, dt, A)), dt, xf, Bf)
  extra, h_out = {}, h
  if c.ssd_window > 0:
    h_out, extra = window_step(
      h, dt, x, B, A, cache, r=c.ssd_window, log_decay_offset=decay_offset(c)
    )
  elif cache.pos is not None:
    extra["pos"] = cache.pos + 1
  if c.state_norm == "token":
    h = normalize_state(h, tau)
  elif c.state_norm == "chunk":  # this token ends a block of absolute positions
    ends = (cache.pos + 1) % c.state_norm_chunk == 0
    h = jnp.where(ends, normalize_state(h, tau), h)
  D = D.astype(f32)
  y = jnp.einsum("bhpn,bhn->bhp", h_out, Cf) + (D[..., None] if D.ndim == 1 else D) * xf
  return y, h, extra
