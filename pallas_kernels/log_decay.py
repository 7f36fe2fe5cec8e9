"""The gradient w.r.t. the per-token log-decay dA of a chunked SSD, without cancellation.

Within a chunk, Acs_l = sum_{k <= l} dA_k and every chunk-local factor of the forward depends
on dA only through differences of Acs:

  diagonal block  y_l  += sum_{s <= l} CB[l, s] exp(Acs_l - Acs_s) (dt x)_s
  state -> output y_l  += exp(Acs_l) C_l h          (h: the state entering the chunk)
  chunk state     S    =  sum_s exp(Acs_end - Acs_s) dt_s x_s B_s^T
  carried decay   h'   =  exp(Acs_end) h + S

so d(loss)/d(dA_k) collects, with G[l, s] = sum_p dy_l o (pair term (l, s) of y_l):

  pairs (l, s) with s < k <= l            rev_cumsum(row - col)_k,
      row[l] = sum_{s < l} G[l, s] + sum_p dy_l o (state -> output term of y_l)
      col[s] = sum_{l > s} G[l, s]
  chunk-state terms s < k                 exclusive_cumsum(st)_k,
      st[s] = exp(Acs_end - Acs_s) dt_s sum_p x_s o (B_s dS^T)   (dS: grad of the state leaving)
  the carried decay (every k of the chunk) carried = sum dS o exp(Acs_end) h.

The diagonal pairs l = s carry no decay and never enter: they dominate under strong decay
(exp(A dt) underflows) and in the textbook "rows - columns" form (d Acs_l = sum_p dy_l o y_l
minus dt_l d(dt_l), then a reverse cumsum) they appear twice, rounded differently (bf16 MXU
operands, fp32 sums), and cancel: that form lost every digit of dA with bf16 inputs at chunk 256.

Used by every chunked implementation (the plain-XLA path, the GPU and the TPU kernels), which
compute row, col, st and carried in their own layouts.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["log_decay_grad"]


def log_decay_grad(row, col, st, carried):
  """d(loss)/d(dA) per token: row, col, st (..., Q) and carried (...) per chunk.

  The last axis is the position inside a chunk; the result has the shape of ``row``.
  """
  rc = row - col
  rev = jnp.flip(jnp.cumsum(jnp.flip(rc, -1), axis=-1), -1)
  # exclusive prefix sum by shifting (cumsum - st would cancel: st is largest at the chunk end)
  excl = jnp.concatenate([jnp.zeros_like(st[..., :1]), jnp.cumsum(st[..., :-1], axis=-1)], -1)
  return rev + excl + carried[..., None]
