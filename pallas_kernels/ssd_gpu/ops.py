"""``impl="pallas_gpu"``: the SSD core built from the Pallas (Triton) kernels in kernel.py.

``ssd_gpu_core(prep, *, chunk_size, interpret=False, D=None)`` follows the core contract of
``mamba2_jax.ssd.api`` for impls that fuse the D skip (``SKIP_IMPLS``): y + D x in the input
dtype (scan_fwd adds it; scan_bwd_s adds D dy to dx and writes dD per row block) and the final
state in ``prep.acc``.
XLA does the cheap glue: padding (L to a multiple of the chunk with dt = 0, dA = 0, x = B = C = 0;
P and N to powers of two >= 16), the per-token log-decay dA = dt * A + log_decay_offset (taken
from the shared prologue, ``prep.dA``; the mitigations need no kernel change) and its per-chunk
cumsum, the per-token segment arrays, and in the backward the sum of the kernels' dB/dC
partials (one per head block: H/(G*HB) per group, none when a head block is a whole group) and
the prefix sums that turn the kernels' per-token terms into the gradient w.r.t. the per-token
log-decay dA = dt * A (pallas_kernels.log_decay: a cancellation-free form; the undecayed
diagonal terms, which dominate under strong decay, never enter it).
Everything of cost O(L * H * P * N) or O(L * Q * H * (P + N)) runs in the Pallas kernels,
forward and backward (a ``jax.custom_vjp``; the backward stores only the chunk-entry states
and recomputes C B^T, the decay matrices and the state weights).

Head blocks (``make_config``): the chunk-local kernels run HB heads of one group per program
and compute C B^T once for them. HB is the largest divisor of H/G that is <= ``max_heads``
(default 2) and still leaves >= ``min_programs`` (default 264, two per SM of an H100) programs
b * T * (Q/BL) * (H/HB); 1 for small problems. ``head_block=`` forces it. With HB > 1 those
kernels run 8 warps (``chunk_warps``): at 4 warps their per-head accumulators spill. Measured by
``compile_check`` (ptxas on the PTX, bf16 2.7b layer, Q = 256, BL = 64): HB = 4 needs 169-202 KiB
of shared memory per program and spills 1.2-1.7 KiB/thread in scan_bwd_s even at 8 warps, so the
default stops at 2.

The kernel's chunk length is the largest power of two <= chunk_size (and <= the padded
sequence), at least 16: the chunk size changes only rounding, never the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.log_decay import log_decay_grad
from pallas_kernels.padding import pad_axis

from . import kernel as K

__all__ = ["ssd_gpu_core", "make_config", "choose_head_block", "pow2_at_least", "pow2_at_most"]


def pow2_at_least(n: int, lo: int = 16) -> int:
  p = lo
  while p < n:
    p *= 2
  return p


def pow2_at_most(n: int, lo: int = 16) -> int:
  p = lo
  while p * 2 <= n:
    p *= 2
  return p


def choose_head_block(b, T, nL, H, G, *, max_heads=2, min_programs=264):
  """Heads per program of the chunk-local kernels: the largest divisor hb of H/G with
  hb <= max_heads that keeps at least min_programs programs, b*T*nL*(H/hb) (default: two
  per SM of an H100's 132); 1 when even hb = 1 gives fewer."""
  R = H // G
  best = 1
  for d in range(1, min(R, max_heads) + 1):
    if R % d == 0 and b * T * nL * (H // d) >= min_programs:
      best = d
  return best


def make_config(
  L,
  P,
  N,
  dtype,
  chunk_size,
  *,
  has_seg,
  interpret,
  H=1,
  G=1,
  batch=1,
  block_l=64,
  block_p=32,
  block_n=64,
  num_warps=None,
  num_stages=2,
  tf32=False,
  head_block=None,
  max_heads=2,
  min_programs=264,
  chunk_warps=None,
) -> K.Config:
  """Static configuration for padded sizes (P, N already powers of two).

  H, G, batch: heads, groups and batch size (for the head block HB of the chunk-local
  kernels: ``head_block`` if given, a divisor of H/G, else the rule of ``choose_head_block``).
  """
  Q = min(pow2_at_most(chunk_size), pow2_at_least(L))
  dt = jnp.dtype(dtype)
  cdt = dt.name if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "float32"
  if num_warps is None:
    num_warps = 4 if P <= 64 else 8
  BL = min(block_l, Q)
  if head_block is None:
    head_block = choose_head_block(
      batch, -(-L // Q), Q // BL, H, G, max_heads=max_heads, min_programs=min_programs
    )
  if H % G or (H // G) % head_block:
    raise ValueError(f"head_block={head_block} must divide H/G = {H}/{G}")
  if chunk_warps is None:
    chunk_warps = num_warps if head_block == 1 else max(num_warps, 8)
  return K.Config(
    Q=Q,
    BL=BL,
    BP=min(block_p, P),
    BN=min(block_n, N),
    HB=int(head_block),
    cdt=cdt,
    has_seg=has_seg,
    num_warps=num_warps,
    num_stages=num_stages,
    interpret=bool(interpret),
    tf32=bool(tf32),
    chunk_warps=int(chunk_warps),
  )


def _chunk_cumsum(dA, Q):
  b, H, Lp = dA.shape
  return jnp.cumsum(dA.reshape(b, H, Lp // Q, Q), axis=-1).reshape(b, H, Lp)


def _fwd(cfg, x, dt, dA, B, C, h0, D, segs):
  acs = _chunk_cumsum(dA, cfg.Q)
  prev, hT = K.state_fwd(x, dt, acs, B, h0, segs, cfg)
  y = K.scan_fwd(x, dt, acs, B, C, prev, segs, D, cfg)
  return y, hT, prev, acs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ssd_kernels(cfg, x, dt, dA, B, C, h0, D, segs):
  """Padded-layout SSD: x (b,Lp,H,P); dt, dA = dt*A (b,H,Lp) fp32; B, C (b,Lp,G,N);
  h0 (b,H,P,N); D (H,P) fp32. Returns y + D x (b,Lp,H,P) in x.dtype and the final state
  (b,H,P,N) fp32.
  """
  y, hT, _, _ = _fwd(cfg, x, dt, dA, B, C, h0, D, segs)
  return y, hT


def _ssd_kernels_fwd(cfg, x, dt, dA, B, C, h0, D, segs):
  y, hT, prev, acs = _fwd(cfg, x, dt, dA, B, C, h0, D, segs)
  return (y, hT), (x, dt, acs, B, C, D, segs, prev)


def _ssd_kernels_bwd(cfg, res, cts):
  x, dt, acs, B, C, D, segs, prev = res
  dy, dhT = cts  # dy in y's dtype (x.dtype): the kernels read it as it is
  b, Lp, H, P = x.shape
  G, N = B.shape[-2:]
  Q = cfg.Q
  T = Lp // Q
  dS, red, dh0 = K.state_bwd(dy, acs, C, prev, dhT.astype(jnp.float32), segs, cfg)
  dx, ddt, dBp, col, st, dD = K.scan_bwd_s(x, dt, acs, B, C, dS, dy, segs, D, cfg)
  dCp, row = K.scan_bwd_l(x, dt, acs, B, C, prev, dy, segs, cfg)
  # Gradient w.r.t. the per-token log-decay dA_k without cancellation (pallas_kernels/log_decay)
  shape = (b, H, T, Q)
  ddA = log_decay_grad(
    row.reshape(shape), col.reshape(shape), st.reshape(shape), jnp.sum(red, axis=(2, 4))
  ).reshape(b, H, Lp)
  # the kernels reduced dB/dC over each head block; nbg = H/(G*HB) partials per group remain
  nbg = H // (G * cfg.HB)
  if nbg == 1:  # one head block per group: the kernels wrote the group's dB/dC (B.dtype)
    dB, dC = dBp.reshape(b, Lp, G, N), dCp.reshape(b, Lp, G, N)
  else:
    dB = jnp.sum(dBp.reshape(b, Lp, G, nbg, N), axis=3).astype(B.dtype)
    dC = jnp.sum(dCp.reshape(b, Lp, G, nbg, N), axis=3).astype(C.dtype)
  return dx, ddt, ddA, dB, dC, dh0, jnp.sum(dD, axis=(0, 1)), None


ssd_kernels.defvjp(_ssd_kernels_fwd, _ssd_kernels_bwd)


def _segment_arrays(seg, Q):
  """seg (b,Lp) run indices -> (seg, segp, sege) per token (see kernel.py)."""
  b, Lp = seg.shape
  T = Lp // Q
  end = seg.reshape(b, T, Q)[:, :, -1]  # (b,T)
  prev_end = jnp.concatenate([jnp.zeros_like(end[:, :1]), end[:, :-1]], axis=1)
  rep = lambda v: jnp.repeat(v, Q, axis=1)  # noqa: E731
  return seg, rep(prev_end), rep(end)


def prepare_padded(prep, chunk_size, interpret, **cfg_kw):
  """Prepared -> (cfg, padded kernel arguments)."""
  x = prep.x
  b, L, H, P = x.shape
  G, N = prep.B.shape[-2:]
  Pp, Np = pow2_at_least(P), pow2_at_least(N)
  cfg = make_config(
    L,
    Pp,
    Np,
    x.dtype,
    chunk_size,
    has_seg=prep.seg is not None,
    interpret=interpret,
    H=H,
    G=G,
    batch=b,
    **cfg_kw,
  )
  Q = cfg.Q
  Lp = -(-L // Q) * Q
  f32 = jnp.float32
  cdt = jnp.dtype(cfg.cdt)
  xk = pad_axis(pad_axis(x.astype(cdt), Lp, 1), Pp, 3)
  Bk = pad_axis(pad_axis(prep.B.astype(cdt), Lp, 1), Np, 3)
  Ck = pad_axis(pad_axis(prep.C.astype(cdt), Lp, 1), Np, 3)
  dt = jnp.transpose(pad_axis(prep.dt.astype(f32), Lp, 1), (0, 2, 1))  # (b,H,Lp), pad dt = 0
  # per-token log-decay dt * A + log_decay_offset (b,H,Lp) from the prologue; pad dA = 0
  dA_src = prep.dA if getattr(prep, "dA", None) is not None else prep.dt * prep.A
  dA = jnp.transpose(pad_axis(dA_src.astype(f32), Lp, 1), (0, 2, 1))
  if prep.initial_state is None:
    h0 = jnp.zeros((b, H, Pp, Np), f32)
  else:
    h0 = pad_axis(pad_axis(prep.initial_state.astype(f32), Pp, 2), Np, 3)
  segs = None
  if prep.seg is not None:
    segs = _segment_arrays(pad_axis(prep.seg.astype(jnp.int32), Lp, 1, mode="edge"), Q)
  return cfg, (xk, dt, dA, Bk, Ck, h0, segs)


def ssd_gpu_core(prep, *, chunk_size: int = 256, interpret=False, D=None, **cfg_kw):
  """SSD core on the Pallas GPU kernels (see module docstring): y + D x (b,L,H,P) in the
  input dtype (fp32 for fp64 inputs), D ((H, P) or None) fused, and the final state in
  ``prep.acc``.

  ``cfg_kw`` (make_config): block_l, block_p, block_n, num_warps, num_stages, tf32. The
  public op uses the defaults; e.g. ``mamba2_jax.ssd.api.register_impl("pallas_gpu_tf32",
  functools.partial(ssd_gpu_core, tf32=True), fuses_skip=True)`` adds a TF32 variant for
  fp32 inputs. ``interpret``: run the kernels in interpret mode (the SSD layer passes True
  exactly when compiling for the CPU).
  """
  b, L, H, P = prep.x.shape
  N = prep.B.shape[-1]
  cfg, (xk, dt, dA, Bk, Ck, h0, segs) = prepare_padded(prep, chunk_size, interpret, **cfg_kw)
  Pp = xk.shape[-1]
  D = jnp.zeros((H, Pp), jnp.float32) if D is None else pad_axis(D.astype(jnp.float32), Pp, 1)
  y, hT = ssd_kernels(cfg, xk, dt, dA, Bk, Ck, h0, D, segs)
  return y[:, :L, :, :P], hT[:, :, :P, :N].astype(prep.acc)
