"""State normalization (paper §3.2): keep each head's SSM state norm under a threshold tau.

    h <- h * min(1, tau / ||h||_F)        per (batch, head), ||.||_F over (headdim, d_state)

(the paper repo multiplies by ||h|| / tau, which grows the state; this is the intended form).
The normalization is applied to the state *carried* to the next step or block; outputs inside
a block read the exact (un-normalized) SSD state started from the normalized entry state.

  granularity "token": after every token: the SSD's per-token reference scan with
    `normalize_state` as its state hook (`ssd(..., impl="reference", state_hook=...)`, see
    ssm.py); equals "chunk" with block 1.
  granularity "chunk": after every block of `block` tokens, blocks aligned to absolute
    positions (multiples of `block` from the start of the stream), exact SSD inside a block
    (any ssd impl: `block_normalized_ssd` calls the op block by block under `lax.scan`). A
    piece that starts or ends mid-block continues / leaves the block open, so prefill in
    pieces == one prefill == decode.

Both are differentiable (plain scans; the chunk path differentiates through the op's VJP).
Thresholds tau (nheads,) per layer live in the model as a `StateNormThreshold` variable (not an
`nnx.Param`: optimizers and parameter checkpoints ignore it); calibrate.py measures and sets them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from mamba2_jax.ssd import ssd

__all__ = [
  "StateNormThreshold",
  "threshold_variable",
  "normalize_state",
  "block_normalized_ssd",
]


class StateNormThreshold(nnx.Variable):
  """Per-head state-norm thresholds tau (nheads,) of one layer; non-trainable."""


def threshold_variable(value: jax.Array) -> StateNormThreshold:
  """A `StateNormThreshold` with logical axis "heads" (sharded eagerly only under a mesh)."""
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return StateNormThreshold(value, out_sharding=("heads",), eager_sharding=eager)


def normalize_state(h: jax.Array, tau: jax.Array) -> jax.Array:
  """h (..., H, P, N) -> h * min(1, tau / ||h||_F) per head; tau (H,) or scalar, > 0."""
  sq = jnp.sum(jnp.square(h), axis=(-2, -1))  # (..., H)
  tau = jnp.asarray(tau, h.dtype)
  over = sq > tau * tau
  # sqrt only where the norm exceeds tau > 0: no sqrt'(0) = inf, so finite gradients at h = 0
  scale = jnp.where(over, tau / jnp.sqrt(jnp.where(over, sq, 1.0)), 1.0)
  return h * scale[..., None, None]


def _place(t, o, Lb, static):
  """Put t (b, L, ...) at offset o of a zero buffer (b, Lb, ...)."""
  L = t.shape[1]
  if static:
    widths = [(0, 0), (o, Lb - o - L)] + [(0, 0)] * (t.ndim - 2)
    return jnp.pad(t, widths)
  buf = jnp.zeros((t.shape[0], Lb) + t.shape[2:], t.dtype)
  return lax.dynamic_update_slice_in_dim(buf, t, o, axis=1)


def block_normalized_ssd(
  x,
  dt,
  A,
  B,
  C,
  *,
  tau,
  block,
  impl="auto",
  chunk_size=256,
  position=0,
  D=None,
  log_decay_offset=0.0,
  initial_state=None,
  segment_ids=None,
):
  """SSD with the state normalized after every block of `block` absolute positions.

  Each block is one `mamba2_jax.ssd.ssd` call (`impl`, `chunk_size`) on *processed* dt (no
  softplus, no clip, dt_scale 1, log_decay_offset 0).
  x (b,L,H,P); dt (b,L,H) processed dt (softplus, clip and dt_scale applied); A (H,) < 0;
  B, C (b,L,G,N); tau (H,) or scalar; position: absolute position of x[:, 0] (int or traced
  int32 scalar, e.g. the cache's `pos`); initial_state (b,H,P,N) the state before it.
  log_decay_offset o <= 0 is folded exactly into (dt, x): dt' = dt + o / A, x' = x dt / dt'
  (so dt' A = dt A + o and dt' x' = dt x), which keeps the block padding (dt = 0) an identity
  step. Returns (y (b,L,H,P) in the accumulation dtype, final state (b,H,P,N)).
  """
  b, L, H, P = x.shape
  f32 = jnp.float32
  acc = jnp.float64 if dt.dtype == jnp.float64 else f32
  xs = x
  if not (isinstance(log_decay_offset, (int, float)) and float(log_decay_offset) == 0.0):
    dt2 = dt + jnp.asarray(log_decay_offset, dt.dtype) / A.astype(dt.dtype)
    xs = x.astype(dt.dtype) * (dt / dt2)[..., None]
    dt = dt2
  static = isinstance(position, int)
  o = position % block
  nblk = -(-(o + L) // block) if static else -(-(L + block - 1) // block)
  Lb = nblk * block
  blocks = lambda t: jnp.moveaxis(t.reshape((b, nblk, block) + t.shape[2:]), 1, 0)  # noqa: E731
  seq = [blocks(_place(t, o, Lb, static)) for t in (xs, dt, B, C)]
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    idx = jnp.arange(Lb)[None]
    placed = _place(seg, o, Lb, static)
    seg_buf = jnp.where(idx < o, seg[:, :1], jnp.where(idx >= o + L, seg[:, -1:], placed))
    seq.append(blocks(seg_buf))
  h0 = jnp.zeros((b, H, P, B.shape[-1]), acc) if initial_state is None else initial_state
  tau = jnp.asarray(tau, acc)
  last0 = None if segment_ids is None else seg[:, 0]

  def body(carry, inp):
    h, last = carry
    j, (xb, dtb, Bb, Cb, *sb) = inp
    segb = sb[0] if sb else None
    if segb is not None:  # a segment starting exactly at the block start drops the carry
      h = jnp.where((segb[:, 0] == last)[:, None, None, None], h, 0.0)
    yb, hb = ssd(
      xb,
      dtb,
      A,
      Bb,
      Cb,
      initial_state=h.astype(acc),
      segment_ids=segb,
      impl=impl,
      chunk_size=chunk_size,
      dt_softplus=False,
      dt_limit=(-math.inf, math.inf),
      return_final_state=True,
    )
    complete = (j + 1) * block <= o + L  # the block's last slot is a real token
    hb = jnp.where(complete, normalize_state(hb.astype(acc), tau), hb.astype(acc))
    return (hb, None if segb is None else segb[:, -1]), yb

  (h_last, _), ys = lax.scan(body, (h0, last0), (jnp.arange(nblk), tuple(seq)))
  y = jnp.moveaxis(ys, 0, 1).reshape((b, Lb, H, P)).astype(acc)
  y = y[:, o : o + L] if static else lax.dynamic_slice_in_dim(y, o, L, axis=1)
  if D is not None:
    Dv = jnp.asarray(D).astype(acc)
    y = y + x.astype(acc) * (Dv[:, None] if Dv.ndim == 1 else Dv)
  return y, h_last
