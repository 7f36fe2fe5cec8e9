"""Oracle SSD: a per-token ``lax.scan`` over the sequence, and the one per-token recurrence.

Per head, in the accumulation dtype (float32, or float64 end to end for float64
inputs, which makes this exact up to float64 rounding):

    h_t = keep_t * exp(dA_t) * h_{t-1} + dt_t * x_t (outer) B_t      h: (P, N)
    y_t = h_t @ C_t

with dA_t = dt_t * A + log_decay_offset, keep_t = 0 where a new segment starts (t > 0
and the run index changes) and h_{-1} = initial_state or 0. The D skip is added by
the caller (api.py). :func:`recurrence_step` is that update for one token; the scan here,
the model's decode step and the window cache's delayed state
(``mamba2_jax.mitigations``) all use it. ``state_hook`` (h -> h) is applied to the state
after every token, once y_t is read: token-level state normalization.

Sliding window (``window=r``, paper eq. 8): y_t = (h_t - W_t * h_{t-r}) @ C_t with
W_t = prod_{j=t-r+1..t} keep_j exp(dA_j), h_{-1} = initial_state and h_s = 0 for
s < -1 (the initial state is the contribution of position -1: it is seen by y_t
for t <= r - 2 and windowed out from t = r - 1 on). The delayed state h_{t-r} is a
second recurrence fed with the inputs delayed by r steps; W_t comes from a running
sum of dA over the window (never a running product) and a running count of resets.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .common import Prepared, expand_groups

__all__ = ["reference_core", "recurrence_step"]

_HI = lax.Precision.HIGHEST


def _delay(t, r):
  """t (L, ...) time-major -> t delayed by r steps (zeros in front)."""
  L = t.shape[0]
  if r >= L:
    return jnp.zeros_like(t)
  return jnp.concatenate([jnp.zeros((r,) + t.shape[1:], t.dtype), t[: L - r]], axis=0)


def recurrence_step(h, decay, dt, x, B):
  """One token of the SSD recurrence, per head: h_t = a_t h_{t-1} + dt_t x_t (outer) B_t.

  h (b, H, P, N); decay a_t and dt (b, H); x (b, H, P); B (b, H, N) (groups expanded to heads).
  """
  return decay[:, :, None, None] * h + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]


def reference_core(
  p: Prepared, *, chunk_size: int | None = None, window: int | None = None, state_hook=None
):
  """Returns (y without the D term, final_state); both in ``p.acc``.

  ``chunk_size`` is accepted for signature compatibility and ignored. ``state_hook``: h -> h
  applied to the state after every token (after y_t is read; the final state is hooked too);
  not with ``window``.
  """
  del chunk_size
  if window is not None and state_hook is not None:
    raise ValueError("ssd: state_hook= cannot be combined with window=")
  acc = p.acc
  b, L, H, P = p.x.shape
  N = p.B.shape[-1]
  x = p.x.astype(acc)
  Bh = expand_groups(p.B.astype(acc), H)  # (b, L, H, N)
  Ch = expand_groups(p.C.astype(acc), H)
  dA = p.dt * p.A if p.dA is None else p.dA
  decay = jnp.exp(dA)  # (b, L, H); dA <= 0 so no overflow
  start = jnp.zeros((b, L), bool)
  if p.seg is not None:
    start = jnp.concatenate([jnp.zeros((b, 1), bool), p.seg[:, 1:] != p.seg[:, :-1]], axis=1)
    decay = jnp.where(start[..., None], jnp.zeros((), acc), decay)
  h0 = jnp.zeros((b, H, P, N), acc) if p.initial_state is None else p.initial_state

  def read(h, C_):
    return jnp.einsum("bhpn,bhn->bhp", h, C_, precision=_HI)

  tm = lambda t: jnp.moveaxis(t, 1, 0)  # time-major
  seq = (tm(decay), tm(p.dt), tm(x), tm(Bh), tm(Ch))

  if window is None:

    def step(h, inp):
      a_t, dt_t, x_t, B_t, C_t = inp
      h = recurrence_step(h, a_t, dt_t, x_t, B_t)
      y_t = read(h, C_t)
      return (h if state_hook is None else state_hook(h)), y_t

    h_last, ys = lax.scan(step, h0, seq)
    return jnp.moveaxis(ys, 0, 1), h_last

  r = window
  # delayed stream (inputs at t - r) and the window bookkeeping
  nres = tm(start.astype(jnp.int32))[..., None]  # (L, b, 1)
  delayed = tuple(_delay(t, r) for t in (tm(decay), tm(p.dt), tm(x), tm(Bh)))
  inject = (jnp.arange(L) == r - 1).astype(acc)  # h_{t-r} = h0 exactly at t = r - 1
  logs = (tm(dA), _delay(tm(dA), r), nres, _delay(nres, r), inject)

  def wstep(carry, inp):
    h, hd, s, n = carry
    (a_t, dt_t, x_t, B_t, C_t), (ad, dtd, xd, Bd), (la, lad, st, std, inj) = inp
    h = recurrence_step(h, a_t, dt_t, x_t, B_t)
    hd = recurrence_step(hd, ad, dtd, xd, Bd) + inj * h0  # hd = h_{t-r}
    s = s + la - lad  # sum of dA over (t-r, t]
    n = n + st - std  # resets in (t-r, t]
    w = jnp.where(n == 0, jnp.exp(jnp.minimum(s, 0.0)), 0.0)  # alpha_{t-r+1:t}
    return (h, hd, s, n), read(h - w[:, :, None, None] * hd, C_t)

  carry0 = (h0, jnp.zeros_like(h0), jnp.zeros((b, H), acc), jnp.zeros((b, 1), jnp.int32))
  (h_last, _, _, _), ys = lax.scan(wstep, carry0, (seq, delayed, logs))
  return jnp.moveaxis(ys, 0, 1), h_last
