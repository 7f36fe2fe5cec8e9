"""Sliding-window correction of the chunked SSD (paper eq. 8, "state difference").

With window r the output reads h_t^(r) = h_t - alpha_{t-r+1:t} h_{t-r} instead of h_t, so

    y^(r)_t = y_t - y_old_t,    y_old_t = C_t . exp(sum_{j=t-r+1..t} dA_j) h_{t-r}

(subtracted only when no segment starts in (t-r, t]; h_{-1} = initial state, h_s = 0 for
s < -1). No per-token state is materialised: with m = t - r in chunk c (offset o),

    h_m = [seg_m == seg before c] exp(Acs[c, o]) prev[c]
          + sum_{i <= o, seg_i == seg_m} exp(Acs[c, o] - Acs[c, i]) dt_i x_i B_i^T,

so y_old = exp(E_t) C_t . prev[c]  +  sum_i exp(E_t - Acs[c, i]) (C_t . B_i) dt_i x_i with
E_t = sum of dA from the start of chunk c to t (<= 0): one state->output GEMM and one
cross-chunk Q x Q block per source-chunk distance d = k - c. With r = m*Q + rho the rows
l >= rho of chunk k read chunk k - m and the rows l < rho chunk k - m - 1 (one distance when
Q | r). A virtual chunk -1 with identity inputs and entry state h0 provides h_{-1}.

E is built from the in-chunk cumsum plus a windowed sum (``lax.reduce_window``) of the d
chunk totals before chunk k, never from a difference of a global cumsum, so its error is
relative to the window's own decay, not to the position. Exponents are clamped to <= 0 and
masks are applied to the C.B factor, so no inf * 0 can occur.

Everything here is plain XLA and differentiated by XLA; the chunk-entry states ``prev`` come
from the custom-VJP core, which accepts a cotangent for them (chunked.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["window_correction", "window_is_noop"]

_HI = lax.Precision.HIGHEST


def _dot(spec, a, b):
  return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=a.dtype)


def window_is_noop(window: int, L: int) -> bool:
  """True when every t - r <= -2, i.e. the window covers the whole sequence and h0."""
  return window >= L + 1


def _shift(a, d, first):
  """Chunk axis 1 shifted by d: out[:, k] = ext[:, k - d + 1], ext = [first, a] (the
  virtual chunk -1 first); zeros where k - d + 1 < 0."""
  T = a.shape[1]
  if d == 0:
    return a
  pad = jnp.zeros((a.shape[0], d - 1) + a.shape[2:], a.dtype)
  return jnp.concatenate([pad, first, a], axis=1)[:, :T]


def _window_sum(tot, d):
  """sum_{j=k-d..k-1} tot[:, j] (tot[:, j < 0] = 0) for every chunk k; tot (b,T,G,R)."""
  if d == 0:
    return jnp.zeros_like(tot)
  b, T = tot.shape[:2]
  tp = jnp.concatenate([jnp.zeros((b, d) + tot.shape[2:], tot.dtype), tot], axis=1)
  ws = lax.reduce_window(tp, np.array(0, tp.dtype), lax.add, (1, d, 1, 1), (1, 1, 1, 1), "VALID")
  return ws[:, :T]


def _nat(t):
  """(b,T,G,R,Q) -> (b,T,Q,G,R)."""
  return jnp.transpose(t, (0, 1, 4, 2, 3))


def window_correction(x, dt, Acs, B, C, h0, prev, seg, window: int):
  """y_old (b,T,Q,G,R,P) to subtract from the chunked output (layouts of chunked.py).

  x (b,T,Q,G,R,P); dt, Acs (b,T,G,R,Q); B, C (b,T,G,Q,N); h0 (b,G,N,K) the state before
  position 0; prev (b,T,G,N,K) the states entering each chunk; seg (b,T,Q) int32 run
  indices or None; window r >= 1 (static).
  """
  b, T, Q, G, R, P = x.shape
  r = window
  m, rho = divmod(r, Q)
  lpos = np.arange(Q)
  shifts = [(m, lpos >= rho)] + ([(m + 1, lpos < rho)] if rho else [])
  t_glob = np.arange(T)[:, None] * Q + lpos[None, :]
  tot = Acs[..., -1]  # (b,T,G,R)
  zero1 = lambda a: jnp.zeros_like(a[:, :1])  # noqa: E731
  if seg is not None:
    seg_end = seg[:, :, -1]
    seg_before = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)
  y_old = jnp.zeros_like(x)
  for d, rows in shifts:
    valid = (t_glob - r >= -1) & rows[None, :]  # (T,Q) static
    if not valid.any():
      continue
    o = np.clip(lpos - r + d * Q, 0, Q - 1)  # offset of t - r in the source chunk
    xs, dts, Acss, Bs = (_shift(a, d, zero1(a)) for a in (x, dt, Acs, B))
    prevs = _shift(prev, d, h0[:, None])
    E = jnp.minimum(Acs + _window_sum(tot, d)[..., None], 0.0)  # (b,T,G,R,Q(l))

    col = lpos[None, :] <= o[:, None]  # (Q(l), Q(s)): i <= t - r
    row_cross = jnp.asarray(valid)[None]  # (1,T,Q)
    row_state = row_cross
    cb_mask = jnp.asarray(col)[None, None]  # (1,1,Q,Q)
    if seg is not None:
      segs = _shift(seg, d, zero1(seg))
      seg_m = segs[:, :, o]  # (b,T,Q(l)) segment of position t - r
      row_cross = row_cross & (seg == seg_m)
      row_state = row_cross & (seg_m == _shift(seg_before, d, zero1(seg_before))[..., None])
      cb_mask = cb_mask & (segs[:, :, None, :] == seg_m[..., None])

    # state term: exp(E_t) C_t . prev[c]
    ys = _dot("btgln,btgnk->btglk", C, prevs).reshape(b, T, G, Q, R, P)
    ys = jnp.swapaxes(ys, 2, 3) * _nat(jnp.exp(E))[..., None]  # (b,T,Q,G,R,P)
    # cross term: sum_{i <= o} exp(E_t - Acs[c, i]) (C_t . B_i) dt_i x_i
    CB = jnp.where(cb_mask[:, :, None], _dot("btgln,btgsn->btgls", C, Bs), 0.0)
    M = jnp.exp(jnp.minimum(E[..., :, None] - Acss[..., None, :], 0.0)) * CB[:, :, :, None]
    xdt = jnp.transpose(xs * _nat(dts)[..., None], (0, 1, 3, 4, 2, 5))  # (b,T,G,R,Q,P)
    yc = jnp.transpose(_dot("btgrls,btgrsp->btgrlp", M, xdt), (0, 1, 4, 2, 3, 5))
    y_old = (
      y_old
      + jnp.where(row_state[..., None, None, None], ys, 0.0)
      + jnp.where(row_cross[..., None, None, None], yc, 0.0)
    )
  return y_old
