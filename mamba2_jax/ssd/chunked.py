"""Chunked SSD in plain XLA (algorithm: docs/model_and_ssd.md): the CPU training path.

Shapes inside the kernel (Q = chunk, T = chunks, R = H // G heads per group,
K = R * P); everything is grouped (b, T, G, ...) so that each matmul is a batched
GEMM over (b, T, G), or (b, T, G, R) for the per-head diagonal block:

  x        (b,T,Q,G,R,P)  natural layout, read only by elementwise fusions
  dt, Acs  (b,T,G,R,Q)    fp32 (fp64 for fp64 inputs); Acs = cumsum(dt * A) per chunk
  B, C     (b,T,G,Q,N)
  states   (b,T,G,N,K)    stored transposed (N, K) so both state GEMMs are NN

Forward, per (b, t, g), every GEMM in NN form:
  CBm  = mask o (C @ B^T)                     (Q,Q)    once per group, mask applied here
  M_r  = exp(min(Acs_l - Acs_s, 0)) o CBm     (R,Q,Q)  the only Q*Q exp pass
  y_d  = M_r @ (dt o x)_r                     (R,Q,P)  dt scales x, never the Q*Q matrix
  S^T  = B^T @ (x o dt o exp(Acs_end - Acs))  (N,K)
  prev = lax.scan over T: h_{t+1} = exp(Acs_end) h_t + S_t (fp32/fp64 carry)
  y_o  = exp(Acs_l) o (C @ prev_t^T)          (Q,K)
The exponent is clamped to <= 0 before exp, so entries outside the causal mask
give exp(0) = 1 (never inf) and are zeroed by the mask on the per-group CB: no
inf * 0 can occur.

Backward: a hand-written ``jax.custom_vjp`` over (x, dt, dA, B, C, h0) (the per-token
log-decay dA, its per-chunk cumsum Acs taken inside) that stores only x, dt, Acs, B, C, the
chunk-entry states prev (b,T,H,P,N) and the state -> output part of y, y_off (b,L,H,P), and
recomputes CB, the Q*Q decay matrix (once, in transposed [s, l] order so that d(dt x) = M^T dy
and dM^T = (dt x) dy^T need no Q*Q transpose) and the per-token factors. The gradient w.r.t.
dA is the cancellation-free form of pallas_kernels/log_decay.py (shared with the kernels):
  row[l] = sum_{s<l} G[l, s] + sum_p dy_l o y_off_l,  col[s] = sum_{l>s} G[l, s]
      (G = dM^T o M^T, one more Q*Q product per head; the undecayed diagonal l = s never enters)
  st[s]  = sum_p (x w dt)_s o d(x w)_s               (chunk-state weights exp(Acs_end - Acs_s))
  carried = sum dS_t o decay_t prev_t                 (the carried chunk decay)
with dx = dt o V, d(dt) = sum_p x o V, V = d(dt x) + exp(Acs_end - Acs) o d(x w). The reverse
state passing is a second scan. The prologue (dA = dt * A, padding, reshapes) is
differentiated by XLA.

Segment resets are masks, never dA = -inf (seg = monotone run indices from
common.segment_runs, so equality means "no reset in between"):
  intra-chunk:    s <= l and seg[l] == seg[s]
  chunk state:    only positions with seg == seg[chunk end]
  carried state:  zeroed when seg[chunk end] != seg[previous chunk end] (0 before chunk 0)
  state -> output: only rows with seg == seg[token before the chunk] (0 for chunk 0)

Single chunk (L <= chunk_size, no initial state; e.g. training on short sequences): a third
custom VJP runs only the diagonal block (no chunk states, state passing or state -> output,
forward or backward); the final state, when asked for, is computed outside it in plain XLA.

Sliding window (``window=r``): the custom VJP has a variant that also returns the
chunk-entry states prev (and accepts their cotangent, added before the reverse state
passing); window.py builds the correction y_old from them in plain XLA, and the output
is y - y_old (gradients through both parts).

CPU notes (2-core AVX-512, H=8, P=64, N=128, L=2048, fp32): fwd ~8 ms, fwd+bwd
~24 ms (chunk 64, glibc tuned) / ~38 ms (default glibc). The state GEMMs
(6 x 2*L*H*P*N flops for fwd+bwd) dominate; chunk 64-128 is fastest (the diagonal
block costs ~Q, the T-stacked states and scan steps ~1/Q; 256 is ~1.4x slower).
XLA:CPU temp buffers above glibc's mmap threshold (32 MiB) are mmap'ed afresh on
every call, so page faults cost as much as a third of fwd+bwd; see
benchmarks/ssd_kernels.py --tune-malloc.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.log_decay import log_decay_grad
from pallas_kernels.padding import pad_axis

from .common import Prepared
from .window import window_correction, window_is_noop

__all__ = ["chunked_core"]

_HI = lax.Precision.HIGHEST


def _dot(spec, a, b):
  return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=a.dtype)


def _nat(t):
  """(b,T,G,R,Q) -> (b,T,Q,G,R) so it broadcasts against natural x[..., None]."""
  return jnp.transpose(t, (0, 1, 4, 2, 3))


def _masks(seg, Q):
  """Segment masks; seg (b,T,Q) int32 run indices or None."""
  causal = jnp.tril(jnp.ones((Q, Q), bool))
  if seg is None:
    return causal, None, None, None
  intra = causal & (seg[:, :, :, None] == seg[:, :, None, :])  # (b,T,Q,Q)
  seg_end = seg[:, :, -1]  # (b,T)
  seg_prev = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)
  state_m = (seg == seg_end[:, :, None])[:, :, None, None, :]  # (b,T,1,1,Q)
  off_m = (seg == seg_prev[:, :, None])[:, :, None, None, :]  # (b,T,1,1,Q)
  keep = (seg_end == seg_prev)[:, :, None, None]  # (b,T,1,1)
  return intra[:, :, None], state_m, off_m, keep


def _decay_matrix(Acs):
  """exp(min(Acs_l - Acs_s, 0)) indexed [l, s]: (b,T,G,R,Q,Q).

  Clamping the exponent to <= 0 *before* exp means entries outside the causal
  mask (where Acs_l - Acs_s > 0 can be huge) give exp(0) = 1 instead of inf; the
  mask is applied to the per-group CB factor, so no inf * 0 can occur. Inside the
  mask the exponent is <= 0 in exact arithmetic (A <= 0, dt >= 0).
  """
  return jnp.exp(jnp.minimum(Acs[..., :, None] - Acs[..., None, :], 0.0))


def _decay_matrix_t(Acs):
  """The transpose of :func:`_decay_matrix`, computed directly (indexed [s, l])."""
  return jnp.exp(jnp.minimum(Acs[..., None, :] - Acs[..., :, None], 0.0))


def _state_weights(Acs, state_m):
  """exp(Acs_end - Acs_s) (masked); (b,T,G,R,Q)."""
  wexp = jnp.exp(jnp.minimum(Acs[..., -1:] - Acs, 0.0))
  if state_m is not None:
    wexp = jnp.where(state_m, wexp, 0.0)
  return wexp


def _chunk_decay(Acs, keep):
  d = jnp.exp(Acs[..., -1])  # (b,T,G,R)
  if keep is not None:
    d = jnp.where(keep, d, 0.0)
  return d


def _out_scale(Acs, off_m):
  e = jnp.exp(Acs)  # (b,T,G,R,Q)
  if off_m is not None:
    e = jnp.where(off_m, e, 0.0)
  return e


def _small_terms(dt, Acs, seg, Q):
  """Per-token factors, materialised once.

  The optimization barriers ask XLA not to fuse their producers (softplus,
  cumsum, exp) into every consumer, which would recompute them once per element
  of the (.., P) or (.., Q, Q) tensors. (XLA:CPU drops barriers but its fusion
  heuristics already keep these materialised; on GPU/TPU the barrier holds.)
  """
  dt, Acs = lax.optimization_barrier((dt, Acs))
  intra, state_m, off_m, keep = _masks(seg, Q)
  wexp = _state_weights(Acs, state_m)  # (b,T,G,R,Q)
  e = _out_scale(Acs, off_m)  # (b,T,G,R,Q)
  decay = _chunk_decay(Acs, keep)  # (b,T,G,R)
  wexp, e, decay = lax.optimization_barrier((wexp, e, decay))
  return dt, Acs, intra, wexp, e, decay


def _grouped(t):
  """(b,T,Q,G,R,P) -> (b,T,G,Q,R*P) (a bitcast when G == 1)."""
  b, T, Q, G, R, P = t.shape
  return jnp.swapaxes(t, 2, 3).reshape(b, T, G, Q, R * P)


def _tmajor(t):
  return jnp.moveaxis(t, 1, 0)  # (b,T,...) <-> (T,b,...): a bitcast when b == 1


def _state_passing(h0, decay, S, reverse=False):
  """h_{t+1} = decay_t * h_t + S_t over the leading (chunk) axis, fp32/fp64 carry.

  Returns (h_T, [h_0 .. h_{T-1}]); with reverse=True the chunks are visited from
  the last to the first (index t still refers to chunk t).
  """

  def step(h, inp):
    d_t, s_t = inp
    return d_t * h + s_t, h

  return lax.scan(step, h0, (decay, S), reverse=reverse)


def _diag_fwd(x, dt, Acs, Bt, C, intra):
  """Diagonal blocks y_d = (L o CB) @ (dt x), head-major (b,T,G,R,Q,P); CB and the mask once
  per group."""
  CBm = jnp.where(intra, _dot("btgln,btgns->btgls", C, Bt), 0.0)
  M = _decay_matrix(Acs) * CBm[:, :, :, None]  # (b,T,G,R,Q(l),Q(s))
  xdt = jnp.transpose(x * _nat(dt)[..., None], (0, 1, 3, 4, 2, 5))  # (b,T,G,R,Q,P)
  return _dot("btgrls,btgrsp->btgrlp", M, xdt)


def _diag_bwd(x, dt, Acs, B, Bt, C, intra, dy):
  """Cotangents through the diagonal blocks: (d(dt x) natural (b,T,Q,G,R,P), dB, dC, row, col).

  In transposed [s, l] order (no Q*Q transposes): d(dt x) = M^T dy, dM^T = (dt x) dy^T,
  dCB^T = sum_r dM^T o L^T. row, col (b,T,G,R,Q): the off-diagonal pair terms of the
  log-decay gradient, G^T = dM^T o M^T summed over s < l (row[l]) and over l > s (col[s]).
  """
  Q = x.shape[2]
  CBT = jnp.swapaxes(_dot("btgln,btgns->btgls", C, Bt), -1, -2)  # (b,T,G,Q(s),Q(l))
  maskT = jnp.swapaxes(intra, -1, -2)
  CBmT = jnp.where(maskT, CBT, 0.0)
  LmT = _decay_matrix_t(Acs)  # (b,T,G,R,Q(s),Q(l))
  dyh = jnp.transpose(dy, (0, 1, 3, 4, 2, 5))  # (b,T,G,R,Q(l),P)
  dxdt = _dot("btgrsl,btgrlp->btgrsp", LmT * CBmT[:, :, :, None], dyh)
  xdt = jnp.transpose(x * _nat(dt)[..., None], (0, 1, 3, 4, 2, 5))  # (b,T,G,R,Q(s),P)
  # NT GEMM: a (P, Q)-transposed copy of dy is a strided element-wise transpose that
  # XLA:CPU runs far slower than the GEMM penalty
  dMT = _dot("btgrsp,btgrlp->btgrsl", xdt, dyh)
  dLT = dMT * LmT
  dCBT = jnp.where(maskT, jnp.sum(dLT, axis=3), 0.0)  # (b,T,G,Q(s),Q(l))
  strictT = maskT & ~jnp.eye(Q, dtype=bool)
  GT = dLT * jnp.where(strictT, CBT, 0.0)[:, :, :, None]  # (b,T,G,R,Q(s),Q(l))
  row, col = jnp.sum(GT, axis=-2), jnp.sum(GT, axis=-1)
  dC = _dot("btgsl,btgsn->btgln", dCBT, B)
  dB = _dot("btgsl,btgln->btgsn", dCBT, C)
  return jnp.transpose(dxdt, (0, 1, 4, 2, 3, 5)), dB, dC, row, col


def _fwd_impl(x, dt, Acs, B, C, h0, seg):
  """x (b,T,Q,G,R,P); dt, Acs (b,T,G,R,Q); B, C (b,T,G,Q,N); h0 (b,G,N,K).

  Returns y (b,T,Q,G,R,P), the states entering each chunk (b,T,G,N,K), the final state
  (b,G,N,K) and the state -> output part of y, y_off (b,T,Q,G,R,P).
  """
  b, T, Q, G, R, P = x.shape
  dt, Acs, intra, wexp, e, decay = _small_terms(dt, Acs, seg, Q)
  Bt = jnp.swapaxes(B, -1, -2)  # (b,T,G,N,Q), small
  yd = _diag_fwd(x, dt, Acs, Bt, C, intra)

  # chunk states, stored transposed as (N, K)
  xw = _grouped(x * _nat(wexp * dt)[..., None])  # (b,T,G,Q,K)
  St = _dot("btgns,btgsk->btgnk", Bt, xw)  # (b,T,G,N,K)

  # state passing (sequential over chunks, fp32/fp64 carry)
  decay_k = jnp.repeat(decay, P, axis=-1)[:, :, :, None, :]  # (b,T,G,1,K)

  h_last, prev = _state_passing(h0, _tmajor(decay_k), _tmajor(St))
  prev = _tmajor(prev)  # (b,T,G,N,K)

  # state -> output
  yo = _dot("btgln,btgnk->btglk", C, prev).reshape(b, T, G, Q, R, P)
  y_off = jnp.transpose(yo * jnp.transpose(e, (0, 1, 2, 4, 3))[..., None], (0, 1, 3, 2, 4, 5))
  y = jnp.transpose(yd, (0, 1, 4, 2, 3, 5)) + y_off
  return y, prev, h_last, y_off


def _cumsum(dA):
  return jnp.cumsum(dA, axis=-1)  # per chunk: (b,T,G,R,Q)


@jax.custom_vjp
def _ssd_chunks(x, dt, dA, B, C, h0, seg):
  y, _, h_last, _ = _fwd_impl(x, dt, _cumsum(dA), B, C, h0, seg)
  return y, h_last


def _ssd_chunks_fwd(x, dt, dA, B, C, h0, seg):
  Acs = _cumsum(dA)
  y, prev, h_last, y_off = _fwd_impl(x, dt, Acs, B, C, h0, seg)
  return (y, h_last), (x, dt, Acs, B, C, seg, prev, y_off)


def _ssd_chunks_bwd(res, cts):
  dy, dh_last = cts
  return _bwd_impl(res, dy, dh_last, None)


def _bwd_impl(res, dy, dh_last, dprev_ext):
  """Cotangents of (x, dt, dA, B, C, h0, seg); ``dprev_ext`` is an extra cotangent of the
  chunk-entry states (b,T,G,N,K) or None."""
  x, dt, Acs, B, C, seg, prev, y_off = res
  b, T, Q, G, R, P = x.shape
  dt, Acs, intra, wexp, e, decay = _small_terms(dt, Acs, seg, Q)
  Bt = jnp.swapaxes(B, -1, -2)  # (b,T,G,N,Q)
  Ct = jnp.swapaxes(C, -1, -2)

  # ---- state -> output
  dyo = _grouped(dy * _nat(e)[..., None])  # (b,T,G,Q,K)
  dprev = _dot("btgnl,btglk->btgnk", Ct, dyo)  # (b,T,G,N,K)
  if dprev_ext is not None:
    dprev = dprev + dprev_ext
  dC = _dot("btglk,btgnk->btgln", dyo, prev)

  # ---- reverse state passing: g_t = dprev_t + decay_t g_{t+1}
  decay_k = jnp.repeat(decay, P, axis=-1)[:, :, :, None, :]  # (b,T,G,1,K)
  dh0, dS = _state_passing(dh_last, _tmajor(decay_k), _tmajor(dprev), reverse=True)
  dS = _tmajor(dS)  # (b,T,G,N,K): gradient w.r.t. the state leaving chunk t
  # the carried chunk decay: sum dS_t o decay_t prev_t, reduced over N, then P
  carried = decay * jnp.sum(jnp.sum(dS * prev, axis=-2).reshape(b, T, G, R, P), axis=-1)

  # ---- chunk states
  dxw = _dot("btgsn,btgnk->btgsk", B, dS)  # (b,T,G,Q,K)
  xw = _grouped(x * _nat(wexp * dt)[..., None])
  dB = _dot("btgsk,btgnk->btgsn", xw, dS)

  # ---- diagonal blocks
  dxdt, dB_d, dC_d, row, col = _diag_bwd(x, dt, Acs, B, Bt, C, intra, dy)
  dB, dC = dB + dB_d, dC + dC_d

  # ---- x, dt, dA: with V = d(dt x) + exp(Acs_end - Acs) o d(x w)
  dxw_n = jnp.swapaxes(dxw.reshape(b, T, G, Q, R, P), 2, 3) * _nat(wexp)[..., None]
  dx, ddt = _x_dt_cotangents(x, dt, dxw_n + dxdt)
  st = _heads(jnp.sum(x * dxw_n, axis=-1)) * dt  # (b,T,G,R,Q)
  row = row + _heads(jnp.sum(dy * y_off, axis=-1))
  return dx, ddt, log_decay_grad(row, col, st, carried), dB, dC, dh0, None


def _heads(t):
  """(b,T,Q,G,R) -> (b,T,G,R,Q)."""
  return jnp.transpose(t, (0, 1, 3, 4, 2))


def _x_dt_cotangents(x, dt, V):
  """dx = dt V, ddt = sum_p x V (b,T,G,R,Q); V = d(dt x) natural (b,T,Q,G,R,P)."""
  return V * _nat(dt)[..., None], _heads(jnp.sum(V * x, axis=-1))


_ssd_chunks.defvjp(_ssd_chunks_fwd, _ssd_chunks_bwd)


@jax.custom_vjp
def _ssd_chunks_states(x, dt, dA, B, C, h0, seg):
  """:func:`_ssd_chunks` that also returns the chunk-entry states prev (b,T,G,N,K)."""
  return _fwd_impl(x, dt, _cumsum(dA), B, C, h0, seg)[:3]


def _ssd_chunks_states_fwd(x, dt, dA, B, C, h0, seg):
  Acs = _cumsum(dA)
  y, prev, h_last, y_off = _fwd_impl(x, dt, Acs, B, C, h0, seg)
  return (y, prev, h_last), (x, dt, Acs, B, C, seg, prev, y_off)


def _ssd_chunks_states_bwd(res, cts):
  dy, dprev, dh_last = cts
  return _bwd_impl(res, dy, dh_last, dprev)


_ssd_chunks_states.defvjp(_ssd_chunks_states_fwd, _ssd_chunks_states_bwd)


@jax.custom_vjp
def _ssd_one_chunk(x, dt, dA, B, C, seg):
  """y of a sequence that is a single chunk and starts from a zero state: only the diagonal
  block (no chunk states, state passing or state -> output term, forward or backward)."""
  return _one_chunk_fwd(x, dt, dA, B, C, seg)[0]


def _one_chunk_fwd(x, dt, dA, B, C, seg):
  Q = x.shape[2]
  dt, Acs, intra, _, _, _ = _small_terms(dt, _cumsum(dA), seg, Q)
  y = jnp.transpose(_diag_fwd(x, dt, Acs, jnp.swapaxes(B, -1, -2), C, intra), (0, 1, 4, 2, 3, 5))
  return y, (x, dt, Acs, B, C, seg)


def _one_chunk_bwd(res, dy):
  x, dt, Acs, B, C, seg = res
  Q = x.shape[2]
  dt, Acs, intra, _, _, _ = _small_terms(dt, Acs, seg, Q)
  dxdt, dB, dC, row, col = _diag_bwd(x, dt, Acs, B, jnp.swapaxes(B, -1, -2), C, intra, dy)
  dx, ddt = _x_dt_cotangents(x, dt, dxdt)
  ddA = log_decay_grad(row, col, jnp.zeros_like(row), jnp.zeros_like(row[..., 0]))
  return dx, ddt, ddA, dB, dC, None


_ssd_one_chunk.defvjp(_one_chunk_fwd, _one_chunk_bwd)


def _one_chunk_final_state(x, dt, Acs, B, seg):
  """The state after a single chunk from a zero state, (b,1,G,N,K), in plain XLA (autodiff):
  sum_s exp(Acs_end - Acs_s) dt_s B_s x_s^T over the positions of the last segment."""
  _, state_m, _, _ = _masks(seg, x.shape[2])
  xw = _grouped(x * _nat(_state_weights(Acs, state_m) * dt)[..., None])  # (b,1,G,Q,K)
  return _dot("btgsn,btgsk->btgnk", B, xw)


def chunked_core(p: Prepared, *, chunk_size: int = 256, window: int | None = None):
  """Chunked SSD core. Returns (y without D, final_state) in ``p.acc``.

  ``window``: sliding window r >= 1 (see window.py) or None.
  """
  acc = p.acc
  b, L, H, P = p.x.shape
  G, N = p.B.shape[-2:]
  R = H // G
  Q = min(chunk_size, L)
  T = -(-L // Q)
  Lp = T * Q

  # pad AFTER the dt prologue: dt = 0, dA = 0, x = B = C = 0 are identity steps; segment
  # ids are edge-padded so padding never starts a new segment.
  chunk = lambda t: jnp.transpose(pad_axis(t, Lp).reshape(b, T, Q, G, R), (0, 1, 3, 4, 2))  # noqa: E731
  x = pad_axis(p.x.astype(acc), Lp).reshape(b, T, Q, G, R, P)
  dt = chunk(p.dt)
  dA = chunk(p.dt * p.A if p.dA is None else p.dA)
  Bc = jnp.swapaxes(pad_axis(p.B.astype(acc), Lp).reshape(b, T, Q, G, N), 2, 3)
  Cc = jnp.swapaxes(pad_axis(p.C.astype(acc), Lp).reshape(b, T, Q, G, N), 2, 3)
  seg = None if p.seg is None else pad_axis(p.seg, Lp, mode="edge").reshape(b, T, Q)
  h0 = (
    jnp.zeros((b, G, N, R * P), acc)
    if p.initial_state is None
    else jnp.transpose(p.initial_state.reshape(b, G, R, P, N), (0, 1, 4, 2, 3)).reshape(
      b, G, N, R * P
    )
  )

  no_window = window is None or window_is_noop(window, L)
  if T == 1 and p.initial_state is None and no_window:
    # one chunk from a zero state (e.g. training on sequences <= chunk_size): only the
    # diagonal block; the final state, when asked for, outside the custom VJP
    y = _ssd_one_chunk(x, dt, dA, Bc, Cc, seg)
    h_last = _one_chunk_final_state(x, dt, _cumsum(dA), Bc, seg)[:, 0]
  elif no_window:
    y, h_last = _ssd_chunks(x, dt, dA, Bc, Cc, h0, seg)
  else:
    y, prev, h_last = _ssd_chunks_states(x, dt, dA, Bc, Cc, h0, seg)
    y = y - window_correction(x, dt, _cumsum(dA), Bc, Cc, h0, prev, seg, window)
  h_last = jnp.transpose(h_last.reshape(b, G, N, R, P), (0, 1, 3, 4, 2)).reshape(b, H, P, N)
  return y.reshape(b, Lp, H, P)[:, :L], h_last
