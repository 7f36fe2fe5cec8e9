"""The sliding window's cache side (paper eq. 8): across prefill pieces and decode steps.

Per layer, y_t = C_t (h_t - alpha_{t-r+1:t} h_{t-r}) + D x_t: only the layer inputs at
t-r+1..t reach y_t (the ordinary h_t keeps propagating). The full-sequence forward calls the
op with `window=r` (the in-op correction: mamba2_jax/ssd/window.py). A continuation needs the
r steps before the piece, so the cache keeps (fields of `Mamba2Cache`):

  ring (win_dt, win_x, win_B) of the last r steps, position p in slot p % r (O(1) decode write);
  win_h  the delayed state h_{pos-1-r} (the state just before the ring's oldest step);
  win_sum the sum of the ring's dt, so alpha_{t-r+1:t} = exp(A * S_t + r log c_a) comes from a
    running sum (never a running product); re-summed exactly at every prefill.

Prefill of a piece of L tokens runs the op over [ring (r) ; piece (L)] from win_h with the
window on and keeps the last L outputs, plus one plain op run over the first L of those
positions for the new delayed state (cost 2L + r). Ring steps never written (or dropped at a
segment start) are identity steps (dt = x = B = 0) with a zero delayed state in front, so
they change nothing. Decode advances the delayed state by the ring's oldest step (the SSD's
`recurrence_step`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from mamba2_jax.ssd import ssd
from mamba2_jax.ssd.common import expand_groups, segment_runs
from mamba2_jax.ssd.reference import recurrence_step

__all__ = ["window_prefill", "window_step"]


def window_prefill(
  x, dt, A, B, C, cache, *, r, impl, log_decay_offset, chunk_size, D=None, segment_ids=None
):
  """One prefill piece with the window on: two `mamba2_jax.ssd.ssd` calls with `impl`.

  x (b,L,H,P), B, C (b,L,G,N) in the compute dtype; dt (b,L,H) float32 processed dt (softplus,
  clip, dt_scale); A (H,); cache: the layer's Mamba2Cache (pos, win_*).
  Returns (y (b,L,H,P), final state h (b,H,P,N), dict of the updated cache fields).
  """
  b, L = x.shape[:2]
  pos = cache.pos
  shift = pos % r
  # ring slots -> chronological order (positions pos-r .. pos-1)
  chron = lambda ring: jnp.roll(ring, -shift, axis=1)  # noqa: E731
  Zx = jnp.concatenate([chron(cache.win_x).astype(x.dtype), x], axis=1)
  Zdt = jnp.concatenate([chron(cache.win_dt), dt.astype(jnp.float32)], axis=1)
  ZB = jnp.concatenate([chron(cache.win_B).astype(B.dtype), B], axis=1)
  ZC = jnp.concatenate([jnp.zeros((b, r) + C.shape[2:], C.dtype), C], axis=1)
  Zseg = None
  if segment_ids is not None:  # the ring continues the segment of the piece's first token
    seg = jnp.asarray(segment_ids)
    Zseg = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (b, r)), seg], axis=1)
  kw = dict(
    impl=impl,
    dt_softplus=False,
    dt_limit=(-math.inf, math.inf),
    chunk_size=chunk_size,
    log_decay_offset=log_decay_offset,
    return_final_state=True,
  )
  y, h = ssd(Zx, Zdt, A, ZB, ZC, D=D, initial_state=cache.win_h, segment_ids=Zseg, window=r, **kw)
  _, hd = ssd(
    Zx[:, :L],
    Zdt[:, :L],
    A,
    ZB[:, :L],
    ZC[:, :L],
    initial_state=cache.win_h,
    segment_ids=None if Zseg is None else Zseg[:, :L],
    **kw,
  )
  ring_dt, ring_x, ring_B = Zdt[:, L:], Zx[:, L:], ZB[:, L:]  # positions pos+L-r .. pos+L-1
  if Zseg is not None:  # steps of earlier segments must not reach later outputs
    runs = segment_runs(Zseg)
    last = runs[:, -1:]
    keep = runs[:, L:] == last  # (b, r)
    ring_dt = jnp.where(keep[..., None], ring_dt, 0.0)
    ring_x = jnp.where(keep[..., None, None], ring_x, 0)
    ring_B = jnp.where(keep[..., None, None], ring_B, 0)
    hd = jnp.where((runs[:, L - 1] == last[:, 0])[:, None, None, None], hd, 0.0)
  q = (pos + L) % r  # slot of position pos+L-r
  slots = lambda t: jnp.roll(t, q, axis=1)  # noqa: E731
  new = dict(
    pos=pos + L,
    win_dt=slots(ring_dt),
    win_x=slots(ring_x).astype(cache.win_x.dtype),
    win_B=slots(ring_B).astype(cache.win_B.dtype),
    win_h=hd.astype(jnp.float32),
    win_sum=jnp.sum(ring_dt, axis=1),
  )
  return y[:, r:], h, new


def window_step(h, dt, x, B, A, cache, *, r, log_decay_offset):
  """Decode step: the state to read out and the updated window fields.

  h (b,H,P,N) float32: the ordinary state after this token; dt (b,H) float32: processed dt of
  this token; x (b,H,P), B (b,G,N): its SSD inputs (compute dtype, B already scaled); cache:
  the layer's Mamba2Cache *before* this token (its ring slot pos % r holds step t - r).
  Returns (h - alpha_{t-r+1:t} h_{t-r} (b,H,P,N) float32, dict of the updated cache fields).
  """
  pos = cache.pos
  slot = pos % r
  take = lambda ring: lax.dynamic_index_in_dim(ring, slot, axis=1, keepdims=False)  # noqa: E731
  odt, ox, oB = take(cache.win_dt), take(cache.win_x), take(cache.win_B)  # step t - r
  oB = expand_groups(oB.astype(jnp.float32), dt.shape[-1])  # (b,H,N)
  off = jnp.float32(log_decay_offset)
  # h_{t-r}: the delayed state advanced by the ring's oldest step
  hd = recurrence_step(cache.win_h, jnp.exp(odt * A + off), odt, ox.astype(jnp.float32), oB)
  s = cache.win_sum - odt + dt  # sum of dt over t-r+1..t
  w = jnp.exp(jnp.minimum(A * s + r * off, 0.0))  # alpha_{t-r+1:t}

  def write(ring, v):
    return lax.dynamic_update_index_in_dim(ring, v.astype(ring.dtype), slot, axis=1)

  new = dict(
    pos=pos + 1,
    win_dt=write(cache.win_dt, dt),
    win_x=write(cache.win_x, x),
    win_B=write(cache.win_B, B),
    win_h=hd,
    win_sum=s,
  )
  return h - w[:, :, None, None] * hd, new
