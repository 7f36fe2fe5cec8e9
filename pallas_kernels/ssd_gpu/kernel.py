"""Pallas (Triton lowering) kernels of the chunked SSD, forward and backward.

Layouts (prepared by ops.py; L padded to T*Q with dt = 0, P and N padded to powers of two >= 16):
  x, dy, y   (b, Lp, H, P)   natural layout, (Q|BL, P) tiles via BlockSpecs
  dt, Acs    (b, H, Lp)      fp32, Acs = per-chunk cumsum of the log-decay dA = dt*A
  B, C       (b, Lp, G, N)   head h reads group h // R
  seg, segp, sege (b, Lp)    int32 run index of the token / of the token before its chunk /
                             of its chunk's last token (0 for the "previous" of chunk 0)
  prev, dS   (b, H, T, P, N) fp32 state entering chunk t / grad of the state leaving chunk t

Head blocks: the chunk-local kernels (scan_fwd, scan_bwd_s, scan_bwd_l) give each program HB
heads of ONE group (Config.HB, a divisor of R = H/G; ops.make_config picks it). Per (row block,
column block) pair the program computes what depends only on the group once: C B^T (Q*Q*N per
chunk, 2/3 of the diagonal block's dot FLOPs at P = 64, N = 128 when done per head), the causal /
segment mask and the loads of B, C; then a static Python loop over the HB heads does the per-head
work (decays, the dots with x / dy, the per-head accumulators). dB and dC depend on the heads
only through sum_h dCB_h, so the kernels sum dCB over the block's heads first and run ONE
(BL, BL) x (BL, N) dot per block (not one per head), and write one (b, Lp, N) partial per head
block: H/HB partials instead of H per-head fp32 arrays; XLA sums the H/(G*HB) partials of a
group, or nothing when HB = R (then the kernels write the group's dB/dC in B's dtype).

Kernels (every dot is 2-D with power-of-two sides >= 16, fp32 accumulation; M = the diagonal
block's matrix mask o C B^T o exp(min(Acs_l - Acs_s, 0)), G[l, s] = sum_p dy_l o M[l, s] (x dt)_s):
  state_fwd  grid (b, H, P/BP * N/BN): sequential lax.fori_loop over the T chunks inside one
             program with the (BP, BN) fp32 state in registers (chunk_state + state_passing fused):
             prev[t] = h;  h = decay_t h + (x o w)^T B,  w = dt exp(min(Acs_end - Acs, 0)).
  scan_fwd   grid (b, T*Q/BL, H/HB): one BL-row block of one chunk for HB heads; per head
             y = exp(Acs_l) C prev^T plus the causal diagonal part, looping over BS-column blocks
             j <= row block (causal skipping): C B^T once, then per head y += (M o dt_s) x_s.
  state_bwd  grid (b, H, P/BP * N/BN): reverse sequential loop, carry g (BP, BN) fp32:
             dS[t] = g;  red[t] = decay_t sum_n g o prev[t];  g = decay_t g + (dy o e)^T C.
  scan_bwd_s grid (b, T*Q/BS, H/HB): per column block: per head dxw = B dS^T and
             dB = sum_h (x o w dt)_h dS_h, then over the row blocks l >= s: C B^T once, per head
             d(dt x) += M^T dy and dCB_h = (x dt) dy^T o mask o decay^T, the column sums
             col[s] = sum_{l > s} G[l, s] (G = dM o M), and dB += (sum_h dCB_h) C.
             Emits dx (x's dtype), ddt, the head block's dB, col and
             st[s] = w_s sum_p (dt x)_s o dxw_s.
  scan_bwd_l grid (b, T*Q/BL, H/HB): per row block: dC = sum_h (dy o e)_h prev_h + sum_{s <= l}
             (sum_h dCB_h) B_s and per head the row sums row[l] = sum_{s < l} G[l, s] +
             sum_p dy_l o y_off_l (C B^T once per column block).
The backward recomputes C B^T, the decay matrices and the chunk states' weights; it stores only
prev (the chunk-entry states), which the forward already produced. The gradient w.r.t. the
per-token log-decay is assembled in ops.py from row, col, st and red by prefix sums in which the
undecayed diagonal terms (l = s), which dominate under strong decay, never appear, so nothing
large cancels (the "rows - columns of sum dy o y" form loses all digits once exp(A dt) underflows).
scan_bwd_s and scan_bwd_l round G[l, s] identically ((dM o mask o decay) o C B^T), so the pairs
that enter both row and col (l, s >= k) cancel exactly in rev_cumsum(row - col).
Outputs: y fp32 (the core contract: ops adds nothing, the public op adds D x in fp32 and casts);
dx in x's dtype (it was cast to it right after the kernel before); ddt, col, row, st fp32.

Numerics (docs/kernels.md, Numerics): exponents are differences within a chunk clamped to <= 0
(exp(min(Acs_l - Acs_s, 0)), never exp(Acs_l) * exp(-Acs_s)); masks are applied with where()
(to the decay factors, which then multiply finite C B^T / dM values) so no inf * 0 can appear;
the carry and all accumulators are fp32; for bf16 inputs the dot
operands are cast to bf16 (tensor cores) with fp32 accumulation, for fp32 inputs the dots run
at Precision.HIGHEST (IEEE fp32; Triton's default would be TF32; Config.tf32 opts in to it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["Config", "state_fwd", "scan_fwd", "state_bwd", "scan_bwd_s", "scan_bwd_l"]

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel configuration.

  Q: chunk length (power of two); BL: row/column block inside a chunk; BP, BN: state tile of
  the sequential kernels; HB: heads per program of the chunk-local kernels (a divisor of the
  heads per group H/G; the HB heads share C B^T and the masks, and their dB/dC are summed in
  the kernel); cdt: dot operand dtype (bf16 for bf16 inputs, fp32 otherwise);
  num_warps / num_stages: Triton launch parameters (chunk_warps: num_warps of the chunk-local
  kernels, num_warps if None); interpret: run in interpret mode;
  tf32: fp32 dots on TF32 tensor cores (faster, ~1e-3 relative) instead of IEEE fp32.
  """

  Q: int
  BL: int
  BP: int
  BN: int
  HB: int = 1
  cdt: str = "float32"
  has_seg: bool = False
  num_warps: int = 4
  num_stages: int = 2
  interpret: bool = False
  tf32: bool = False
  chunk_warps: int | None = None

  @property
  def compiler_params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

  @property
  def chunk_compiler_params(self):
    return plgpu.CompilerParams(
      num_warps=self.chunk_warps or self.num_warps, num_stages=self.num_stages
    )


def _dot(a, b, cfg: Config, *, trans_a=False, trans_b=False):
  """2-D dot, fp32 accumulation; transposes are folded into the contracting dims."""
  cdt = jnp.dtype(cfg.cdt)
  prec = lax.Precision.HIGHEST if cdt == F32 and not cfg.tf32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(
    a.astype(cdt), b.astype(cdt), dims, precision=prec, preferred_element_type=F32
  )


def _pair_dot(a, b, cfg: Config):
  """a bᵀ to about fp32 accuracy for the pair terms dM of the log-decay gradient, whose row
  and column sums cancel when the decay is weak (plain bf16 operands: dA error 2.8e-2 there,
  3.8x the xla path's). With bf16 dots each operand is split into bf16 high and low parts and
  three tensor-core dots (hi hi + lo hi + hi lo) replace one; fp32 configs use ``_dot``."""
  if jnp.dtype(cfg.cdt) == F32:
    return _dot(a, b, cfg, trans_b=True)
  cdt = jnp.dtype(cfg.cdt)
  a, b = a.astype(F32), b.astype(F32)
  ah, bh = a.astype(cdt), b.astype(cdt)
  al, bl = (a - ah.astype(F32)).astype(cdt), (b - bh.astype(F32)).astype(cdt)
  return _dot(ah, bh, cfg, trans_b=True) + (
    _dot(al, bh, cfg, trans_b=True) + _dot(ah, bl, cfg, trans_b=True)
  )


def _last(v, n):
  """v[n-1] of a 1-D block value, as a masked reduction (no scalar extraction)."""
  return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, v.shape, 0) == n - 1, v, 0))


def _launch(cfg: Config, kernel, name, grid, in_specs, out_specs, out_shape, args, *, chunk=False):
  """One pallas_call with the config's compiler params (chunk: those of the chunk-local
  kernels) and interpret mode."""
  params = cfg.chunk_compiler_params if chunk else cfg.compiler_params
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=params,
    interpret=cfg.interpret,
    name=name,
  )(*args)


def _seg_refs(has_seg, refs):
  if has_seg:
    return refs[:3], refs[3:]
  return (None, None, None), refs


# --------------------------------------------------------------------------- forward states
def _state_fwd_kernel(*refs, cfg: Config, T: int):
  x_ref, dt_ref, acs_ref, b_ref, h0_ref = refs[:5]
  (seg_ref, segp_ref, sege_ref), rest = _seg_refs(cfg.has_seg, refs[5:])
  prev_ref, hT_ref = rest
  Q = cfg.Q

  def body(t, h):
    sl = pl.ds(t * Q, Q)
    acs = acs_ref[sl]
    dt = dt_ref[sl]
    acs_end = _last(acs, Q)
    w = jnp.exp(jnp.minimum(acs_end - acs, 0.0)) * dt
    dec = jnp.exp(acs_end)
    if cfg.has_seg:
      seg, segp, sege = seg_ref[sl], segp_ref[sl], sege_ref[sl]
      w = jnp.where(seg == sege, w, 0.0)
      dec = jnp.where(_last(sege, Q) == _last(segp, Q), dec, 0.0)
    xw = x_ref[sl, :].astype(F32) * w[:, None]  # (Q, BP)
    S = _dot(xw, b_ref[sl, :], cfg, trans_a=True)  # (BP, BN)
    prev_ref[t] = h
    return dec * h + S

  hT_ref[...] = lax.fori_loop(0, T, body, h0_ref[...].astype(F32))


def state_fwd(x, dt, acs, B, h0, segs, cfg: Config):
  """x (b,Lp,H,P); dt, acs (b,H,Lp); B (b,Lp,G,N); h0 (b,H,P,N) -> prev (b,H,T,P,N), hT."""
  b, Lp, H, P = x.shape
  G, N = B.shape[-2:]
  R = H // G
  T = Lp // cfg.Q
  nN = N // cfg.BN
  grid = (b, H, (P // cfg.BP) * nN)
  in_specs = [
    pl.BlockSpec((None, Lp, None, cfg.BP), lambda i, h, k: (i, 0, h, k // nN)),
    pl.BlockSpec((None, None, Lp), lambda i, h, k: (i, h, 0)),
    pl.BlockSpec((None, None, Lp), lambda i, h, k: (i, h, 0)),
    pl.BlockSpec((None, Lp, None, cfg.BN), lambda i, h, k: (i, 0, h // R, k % nN)),
    pl.BlockSpec((None, None, cfg.BP, cfg.BN), lambda i, h, k: (i, h, k // nN, k % nN)),
  ]
  args = [x, dt, acs, B, h0]
  if cfg.has_seg:
    in_specs += [pl.BlockSpec((None, Lp), lambda i, h, k: (i, 0))] * 3
    args += list(segs)
  out_specs = [
    pl.BlockSpec((None, None, T, cfg.BP, cfg.BN), lambda i, h, k: (i, h, 0, k // nN, k % nN)),
    pl.BlockSpec((None, None, cfg.BP, cfg.BN), lambda i, h, k: (i, h, k // nN, k % nN)),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, H, T, P, N), F32), jax.ShapeDtypeStruct((b, H, P, N), F32)]
  return _launch(
    cfg,
    functools.partial(_state_fwd_kernel, cfg=cfg, T=T),
    "ssd_state_fwd",
    grid,
    in_specs,
    out_specs,
    out_shape,
    args,
  )


# --------------------------------------------------------------------------- forward outputs
def _causal_mask(cfg, lb, j, seg_l=None, seg_s=None):
  """Mask indexed [l, s] (l in row block lb, s in column block j): s <= l, same run."""
  BL = cfg.BL
  rows = lb * BL + lax.broadcasted_iota(jnp.int32, (BL, BL), 0)
  cols = j * BL + lax.broadcasted_iota(jnp.int32, (BL, BL), 1)
  m = rows >= cols
  if seg_l is not None:
    m = m & (seg_l[:, None] == seg_s[None, :])
  return m


def _causal_mask_t(cfg, sb, j, seg_s=None, seg_l=None):
  """The transposed mask, indexed [s, l] (s in column block sb, l in row block j)."""
  BL = cfg.BL
  srows = sb * BL + lax.broadcasted_iota(jnp.int32, (BL, BL), 0)
  lcols = j * BL + lax.broadcasted_iota(jnp.int32, (BL, BL), 1)
  m = lcols >= srows
  if seg_s is not None:
    m = m & (seg_s[:, None] == seg_l[None, :])
  return m


def _offdiag(cfg, ib, j):
  """[i, j] of block (ib, j): not on the diagonal (global row != global column)."""
  BL = cfg.BL
  rows = ib * BL + lax.broadcasted_iota(jnp.int32, (BL, BL), 0)
  cols = j * BL + lax.broadcasted_iota(jnp.int32, (BL, BL), 1)
  return rows != cols


def _decay(acs_l, acs_s):
  """exp(min(Acs_l - Acs_s, 0)) indexed [l, s] (a difference within the chunk, <= 1)."""
  return jnp.exp(jnp.minimum(acs_l[:, None] - acs_s[None, :], 0.0))


def _scan_fwd_kernel(*refs, cfg: Config, nL: int):
  x_ref, dt_ref, acs_ref, b_ref, c_ref, prev_ref = refs[:6]
  (seg_ref, segp_ref, _), rest = _seg_refs(cfg.has_seg, refs[6:])
  d_ref, y_ref = rest
  BL, HB = cfg.BL, cfg.HB
  lb = pl.program_id(1) % nL
  rl = pl.ds(lb * BL, BL)
  c_l = c_ref[rl, :]  # group-level: shared by the HB heads
  seg_l = seg_ref[rl] if cfg.has_seg else None
  acs_l = [acs_ref[k, rl] for k in range(HB)]
  accs = []
  for k in range(HB):
    e = jnp.exp(acs_l[k])
    if cfg.has_seg:
      e = jnp.where(seg_l == segp_ref[rl], e, 0.0)
    accs.append(_dot(c_l, prev_ref[k], cfg, trans_b=True) * e[:, None])  # (BL, P)

  def body(j, accs):
    rs = pl.ds(j * BL, BL)
    # C B^T and the mask once per (row block, column block) for the whole head block
    cb = _dot(c_l, b_ref[rs, :], cfg, trans_b=True)  # (BL, BS)
    mask = _causal_mask(cfg, lb, j, seg_l, seg_ref[rs] if cfg.has_seg else None)
    cbm = jnp.where(mask, cb, 0.0)
    out = []
    for k in range(HB):
      m = cbm * _decay(acs_l[k], acs_ref[k, rs]) * dt_ref[k, rs][None, :]
      out.append(accs[k] + _dot(m, x_ref[rs, k, :], cfg))
    return tuple(out)

  accs = lax.fori_loop(0, lb + 1, body, tuple(accs))
  for k in range(HB):  # + the D skip
    y = accs[k] + d_ref[k, :][None, :] * x_ref[rl, k, :].astype(F32)
    y_ref[:, k, :] = y.astype(y_ref.dtype)


def _chunk_specs(cfg, nbg, nL, P, N, Q, *, with_dy=False):
  """BlockSpecs of the chunk-local kernels, grid (b, T*nL, H/HB): program (i, k, hb) owns
  heads hb*HB .. hb*HB + HB - 1, all of group hb // nbg (nbg = head blocks per group)."""
  HB = cfg.HB
  tq = lambda i, k, h: (i, k // nL, h, 0)  # noqa: E731
  specs = [
    pl.BlockSpec((None, Q, HB, P), tq),  # x (whole chunk, HB heads)
    pl.BlockSpec((None, HB, Q), lambda i, k, h: (i, h, k // nL)),  # dt
    pl.BlockSpec((None, HB, Q), lambda i, k, h: (i, h, k // nL)),  # Acs
    pl.BlockSpec((None, Q, None, N), lambda i, k, h: (i, k // nL, h // nbg, 0)),  # B
    pl.BlockSpec((None, Q, None, N), lambda i, k, h: (i, k // nL, h // nbg, 0)),  # C
    pl.BlockSpec((None, HB, None, P, N), lambda i, k, h: (i, h, k // nL, 0, 0)),  # state
  ]
  if with_dy:
    specs.append(pl.BlockSpec((None, Q, HB, P), tq))  # dy (whole chunk, HB heads)
  return specs


def _seg_specs(cfg, nL, Q):
  return [pl.BlockSpec((None, Q), lambda i, k, h: (i, k // nL))] * 3


def _chunk_grid(cfg, b, Lp, H, G):
  """(grid, nL, head blocks per group) of the chunk-local kernels."""
  R = H // G
  assert H % G == 0 and R % cfg.HB == 0, (H, G, cfg.HB)
  nL = cfg.Q // cfg.BL
  return (b, (Lp // cfg.Q) * nL, H // cfg.HB), nL, R // cfg.HB


def _skip_spec(cfg, P):
  """(HB, P) blocks of the skip D (H, P) fp32."""
  return pl.BlockSpec((cfg.HB, P), lambda i, k, h: (h, 0))


def scan_fwd(x, dt, acs, B, C, prev, segs, D, cfg: Config):
  """-> y (b, Lp, H, P) in x.dtype, with the skip D (H, P) fp32."""
  b, Lp, H, P = x.shape
  G, N = B.shape[-2:]
  Q, BL, HB = cfg.Q, cfg.BL, cfg.HB
  grid, nL, nbg = _chunk_grid(cfg, b, Lp, H, G)
  in_specs = _chunk_specs(cfg, nbg, nL, P, N, Q)
  args = [x, dt, acs, B, C, prev]
  if cfg.has_seg:
    in_specs += _seg_specs(cfg, nL, Q)
    args += list(segs)
  in_specs.append(_skip_spec(cfg, P))
  args.append(D)
  return _launch(
    cfg,
    functools.partial(_scan_fwd_kernel, cfg=cfg, nL=nL),
    "ssd_scan_fwd",
    grid,
    in_specs,
    pl.BlockSpec((None, BL, HB, P), lambda i, k, h: (i, k, h, 0)),
    jax.ShapeDtypeStruct((b, Lp, H, P), x.dtype),
    args,
    chunk=True,
  )


# --------------------------------------------------------------------------- backward states
def _state_bwd_kernel(*refs, cfg: Config, T: int):
  dy_ref, acs_ref, c_ref, prev_ref, dhT_ref = refs[:5]
  (seg_ref, segp_ref, sege_ref), rest = _seg_refs(cfg.has_seg, refs[5:])
  dS_ref, red_ref, dh0_ref = rest
  Q = cfg.Q

  def body(tt, g):
    t = T - 1 - tt
    sl = pl.ds(t * Q, Q)
    acs = acs_ref[sl]
    dS_ref[t] = g
    e = jnp.exp(acs)
    dec = jnp.exp(_last(acs, Q))
    if cfg.has_seg:
      seg, segp, sege = seg_ref[sl], segp_ref[sl], sege_ref[sl]
      e = jnp.where(seg == segp, e, 0.0)
      dec = jnp.where(_last(sege, Q) == _last(segp, Q), dec, 0.0)
    # d(chunk log-decay): only the carried term dec * h_t (no cancellation against S_t)
    red_ref[t] = jnp.sum(g * prev_ref[t], axis=1) * dec
    dye = dy_ref[sl, :].astype(F32) * e[:, None]  # (Q, BP)
    return dec * g + _dot(dye, c_ref[sl, :], cfg, trans_a=True)

  dh0_ref[...] = lax.fori_loop(0, T, body, dhT_ref[...].astype(F32))


def state_bwd(dy, acs, C, prev, dhT, segs, cfg: Config):
  """-> dS (b,H,T,P,N) (grad of the state leaving chunk t), red (b,H,nN,T,P), dh0 (b,H,P,N).

  red summed over (nN, P) is the gradient w.r.t. the chunk's total log-decay through the
  carried term decay_t * h_t of the state passing.
  """
  b, Lp, H, P = dy.shape
  G, N = C.shape[-2:]
  R = H // G
  T = Lp // cfg.Q
  nN = N // cfg.BN
  grid = (b, H, (P // cfg.BP) * nN)
  st = pl.BlockSpec((None, None, cfg.BP, cfg.BN), lambda i, h, k: (i, h, k // nN, k % nN))
  st_all = pl.BlockSpec((None, None, T, cfg.BP, cfg.BN), lambda i, h, k: (i, h, 0, k // nN, k % nN))
  in_specs = [
    pl.BlockSpec((None, Lp, None, cfg.BP), lambda i, h, k: (i, 0, h, k // nN)),
    pl.BlockSpec((None, None, Lp), lambda i, h, k: (i, h, 0)),
    pl.BlockSpec((None, Lp, None, cfg.BN), lambda i, h, k: (i, 0, h // R, k % nN)),
    st_all,
    st,
  ]
  args = [dy, acs, C, prev, dhT]
  if cfg.has_seg:
    in_specs += [pl.BlockSpec((None, Lp), lambda i, h, k: (i, 0))] * 3
    args += list(segs)
  out_specs = [
    st_all,
    pl.BlockSpec((None, None, None, T, cfg.BP), lambda i, h, k: (i, h, k % nN, 0, k // nN)),
    st,
  ]
  out_shape = [
    jax.ShapeDtypeStruct((b, H, T, P, N), F32),
    jax.ShapeDtypeStruct((b, H, nN, T, P), F32),
    jax.ShapeDtypeStruct((b, H, P, N), F32),
  ]
  return _launch(
    cfg,
    functools.partial(_state_bwd_kernel, cfg=cfg, T=T),
    "ssd_state_bwd",
    grid,
    in_specs,
    out_specs,
    out_shape,
    args,
  )


# --------------------------------------------------------------------------- backward, columns
def _scan_bwd_s_kernel(*refs, cfg: Config, nL: int):
  x_ref, dt_ref, acs_ref, b_ref, c_ref, dS_ref, dy_ref = refs[:7]
  (seg_ref, _, sege_ref), rest = _seg_refs(cfg.has_seg, refs[7:])
  d_ref, dx_ref, ddt_ref, db_ref, col_ref, st_ref, dd_ref = rest
  Q, BL, HB = cfg.Q, cfg.BL, cfg.HB
  sb = pl.program_id(1) % nL
  rs = pl.ds(sb * BL, BL)
  b_s = b_ref[rs, :]  # group-level: shared by the HB heads
  seg_s = seg_ref[rs] if cfg.has_seg else None
  acs_s = [acs_ref[k, rs] for k in range(HB)]
  dt_s = [dt_ref[k, rs] for k in range(HB)]

  def xdt(k):  # (dt x)_s of head k, reloaded where needed (not held across the loop)
    return x_ref[rs, k, :].astype(F32) * dt_s[k][:, None]

  ws = []
  db = None
  for k in range(HB):
    w = jnp.exp(jnp.minimum(_last(acs_ref[k, :], Q) - acs_s[k], 0.0))
    if cfg.has_seg:
      w = jnp.where(seg_s == sege_ref[rs], w, 0.0)
    ws.append(w)
    t = _dot(xdt(k) * w[:, None], dS_ref[k], cfg)  # (BS, N): chunk-state term of dB
    db = t if db is None else db + t

  def body(j, carry):
    dxdts, db, cols = carry
    rl = pl.ds(j * BL, BL)
    c_l = c_ref[rl, :]
    # transposed [s, l] order; C B^T and the masks once for the head block
    seg_l = seg_ref[rl] if cfg.has_seg else None
    mask_t = _causal_mask_t(cfg, sb, j, seg_s, seg_l)
    offdiag = _offdiag(cfg, sb, j)  # the diagonal l = s carries no decay: not in col
    cb_t = _dot(b_s, c_l, cfg, trans_b=True)  # (BS, BL)
    dcb_sum = None
    new_dxdts, new_cols = [], []
    for k in range(HB):
      dy_l = dy_ref[rl, k, :]
      # [s, l] = mask^T o exp(min(Acs_l - Acs_s, 0))
      decay_t = jnp.where(
        mask_t, jnp.exp(jnp.minimum(acs_ref[k, rl][None, :] - acs_s[k][:, None], 0.0)), 0.0
      )
      m_t = cb_t * decay_t  # M^T
      new_dxdts.append(dxdts[k] + _dot(m_t, dy_l, cfg))  # (BS, P)
      dm_t = _pair_dot(xdt(k), dy_l, cfg)  # (BS, BL)
      dcb_t = dm_t * decay_t
      dcb_sum = dcb_t if dcb_sum is None else dcb_sum + dcb_t
      # column sums of G = dM o M over l > s, rounded exactly as scan_bwd_l's row sums
      # ((dM o decay) o C B^T): rev_cumsum(row - col) cancels the pairs s >= k exactly
      new_cols.append(cols[k] + jnp.sum(jnp.where(offdiag, dcb_t * cb_t, 0.0), axis=1))
    # dB of the whole head block: one dot with the head-summed dCB
    return tuple(new_dxdts), db + _dot(dcb_sum, c_l, cfg), tuple(new_cols)

  init = (
    tuple(jnp.zeros((BL, x_ref.shape[-1]), F32) for _ in range(HB)),
    db,
    tuple(jnp.zeros((BL,), F32) for _ in range(HB)),
  )
  dxdts, db, cols = lax.fori_loop(sb, nL, body, init)
  for k in range(HB):
    dS = dS_ref[k]
    dxw = _dot(b_s, dS, cfg, trans_b=True)  # (BS, P)
    x_s = x_ref[rs, k, :].astype(F32)
    dy_s = dy_ref[rs, k, :].astype(F32)
    v = dxw * ws[k][:, None] + dxdts[k]
    dx = v * dt_s[k][:, None] + d_ref[k, :][None, :] * dy_s  # + the D skip's
    dx_ref[:, k, :] = dx.astype(dx_ref.dtype)
    dd_ref[k, :] = jnp.sum(dy_s * x_s, axis=0)
    ddt_ref[k, :] = jnp.sum(v * x_s, axis=1)
    col_ref[k, :] = cols[k]
    st_ref[k, :] = jnp.sum(dxw * (x_s * dt_s[k][:, None]), axis=1) * ws[k]
  db_ref[...] = db.astype(db_ref.dtype)


def _partial_dtype(nbg, dtype):
  """dB/dC partials: one per head block; already the group's sum (in the input dtype) when
  one head block covers the group, else fp32 partials that XLA sums (nbg per group)."""
  return jnp.dtype(dtype) if nbg == 1 else F32


def scan_bwd_s(x, dt, acs, B, C, dS, dy, segs, D, cfg: Config):
  """-> dx (b,Lp,H,P) in x.dtype, ddt (b,H,Lp) fp32, dB partials (b,Lp,H/HB,N), col, st
  (b,H,Lp) fp32, and the skip's dD per column block (b, Lp/BL, H, P) fp32.

  dB partial [.., hb, :] is the sum over the HB heads of head block hb (group hb // nbg); it
  is in B.dtype when nbg = 1 (the group's dB) and fp32 otherwise.
  col[s] = sum_{l > s} G[l, s] (G = dM o M, the diagonal block's pair terms) and
  st[s] = w_s dt_s sum_p x_s o (B_s dS^T) (chunk-state term), for the log-decay gradient.
  """
  b, Lp, H, P = x.shape
  G, N = B.shape[-2:]
  Q, BL, HB = cfg.Q, cfg.BL, cfg.HB
  grid, nL, nbg = _chunk_grid(cfg, b, Lp, H, G)
  in_specs = _chunk_specs(cfg, nbg, nL, P, N, Q, with_dy=True)
  args = [x, dt, acs, B, C, dS, dy]
  if cfg.has_seg:
    in_specs += _seg_specs(cfg, nL, Q)
    args += list(segs)
  in_specs.append(_skip_spec(cfg, P))
  args.append(D)
  per_tok = pl.BlockSpec((None, HB, BL), lambda i, k, h: (i, h, k))
  out_specs = [
    pl.BlockSpec((None, BL, HB, P), lambda i, k, h: (i, k, h, 0)),
    per_tok,
    pl.BlockSpec((None, BL, None, N), lambda i, k, h: (i, k, h, 0)),
    per_tok,
    per_tok,
    pl.BlockSpec((None, None, HB, P), lambda i, k, h: (i, k, h, 0)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((b, Lp, H, P), x.dtype),
    jax.ShapeDtypeStruct((b, H, Lp), F32),
    jax.ShapeDtypeStruct((b, Lp, H // HB, N), _partial_dtype(nbg, B.dtype)),
    jax.ShapeDtypeStruct((b, H, Lp), F32),
    jax.ShapeDtypeStruct((b, H, Lp), F32),
    jax.ShapeDtypeStruct((b, Lp // BL, H, P), F32),
  ]
  return _launch(
    cfg,
    functools.partial(_scan_bwd_s_kernel, cfg=cfg, nL=nL),
    "ssd_scan_bwd_s",
    grid,
    in_specs,
    out_specs,
    out_shape,
    args,
    chunk=True,
  )


# --------------------------------------------------------------------------- backward, rows
def _scan_bwd_l_kernel(*refs, cfg: Config, nL: int):
  x_ref, dt_ref, acs_ref, b_ref, c_ref, prev_ref, dy_ref = refs[:7]
  (seg_ref, segp_ref, _), rest = _seg_refs(cfg.has_seg, refs[7:])
  dc_ref, row_ref = rest
  BL, HB = cfg.BL, cfg.HB
  lb = pl.program_id(1) % nL
  rl = pl.ds(lb * BL, BL)
  c_l = c_ref[rl, :]  # group-level: shared by the HB heads
  seg_l = seg_ref[rl] if cfg.has_seg else None
  acs_l = [acs_ref[k, rl] for k in range(HB)]
  dc = None
  rows = []
  for k in range(HB):
    e = jnp.exp(acs_l[k])
    if cfg.has_seg:
      e = jnp.where(seg_l == segp_ref[rl], e, 0.0)
    dy_l = dy_ref[rl, k, :].astype(F32)
    prev = prev_ref[k]
    t = _dot(dy_l * e[:, None], prev, cfg)  # (BL, N)
    dc = t if dc is None else dc + t
    # state -> output term of the log-decay gradient: sum_p dy o y_off
    rows.append(jnp.sum(dy_l * _dot(c_l, prev, cfg, trans_b=True), axis=1) * e)

  def body(j, carry):
    dc, rows = carry
    rs = pl.ds(j * BL, BL)
    b_s = b_ref[rs, :]
    mask = _causal_mask(cfg, lb, j, seg_l, seg_ref[rs] if cfg.has_seg else None)
    offdiag = _offdiag(cfg, lb, j)  # row sums of G = dM o M over s < l
    # C B^T (for the row sums) once for the head block
    cb = _dot(c_l, b_s, cfg, trans_b=True)
    dcb_sum = None
    new_rows = []
    for k in range(HB):
      xdt_s = x_ref[rs, k, :].astype(F32) * dt_ref[k, rs][:, None]
      dm = _pair_dot(dy_ref[rl, k, :], xdt_s, cfg)  # (BL, BS)
      dcb = dm * jnp.where(mask, _decay(acs_l[k], acs_ref[k, rs]), 0.0)
      dcb_sum = dcb if dcb_sum is None else dcb_sum + dcb
      # same rounding as scan_bwd_s's column sums (see there)
      new_rows.append(rows[k] + jnp.sum(jnp.where(offdiag, dcb * cb, 0.0), axis=1))
    # dC of the whole head block: one dot with the head-summed dCB
    return dc + _dot(dcb_sum, b_s, cfg), tuple(new_rows)

  dc, rows = lax.fori_loop(0, lb + 1, body, (dc, tuple(rows)))
  dc_ref[...] = dc.astype(dc_ref.dtype)
  for k in range(HB):
    row_ref[k, :] = rows[k]


def scan_bwd_l(x, dt, acs, B, C, prev, dy, segs, cfg: Config):
  """-> dC partials (b, Lp, H/HB, N) (as dB in scan_bwd_s) and row (b, H, Lp) fp32.

  row[l] = sum_{s < l} G[l, s] + sum_p dy_l o y_off_l (log-decay gradient terms).
  """
  b, Lp, H, P = x.shape
  G, N = B.shape[-2:]
  Q, BL, HB = cfg.Q, cfg.BL, cfg.HB
  grid, nL, nbg = _chunk_grid(cfg, b, Lp, H, G)
  in_specs = _chunk_specs(cfg, nbg, nL, P, N, Q, with_dy=True)
  args = [x, dt, acs, B, C, prev, dy]
  if cfg.has_seg:
    in_specs += _seg_specs(cfg, nL, Q)
    args += list(segs)
  out_specs = [
    pl.BlockSpec((None, BL, None, N), lambda i, k, h: (i, k, h, 0)),
    pl.BlockSpec((None, HB, BL), lambda i, k, h: (i, h, k)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((b, Lp, H // HB, N), _partial_dtype(nbg, C.dtype)),
    jax.ShapeDtypeStruct((b, H, Lp), F32),
  ]
  return _launch(
    cfg,
    functools.partial(_scan_bwd_l_kernel, cfg=cfg, nL=nL),
    "ssd_scan_bwd_l",
    grid,
    in_specs,
    out_specs,
    out_shape,
    args,
    chunk=True,
  )
