"""Mosaic TPU kernels of the chunked SSD: one fused forward and one fused backward kernel.

See the package docstring (``pallas_kernels/ssd_tpu/__init__.py``) for the design. Grid
(parallel units, chunks, head blocks): the leading axis flattens (batch, group, core split)
and is the only "parallel" one (so megacore chips split it across their TensorCores even at
batch 1 per device and one group); chunks and head blocks are "arbitrary", head blocks
innermost, so everything per (chunk, group) is computed once and shared by the head blocks:
C·Bᵀ (a VMEM scratch filled at head block 0) and, in the backward, dB and dC, accumulated over
the heads in fp32 VMEM scratch and written once per (chunk, group) in B's dtype (fp32 partials,
one per core split, when the heads are split over two cores).

Shapes of one program:

  x, y, dy, dx  (Q, hb*P) packed natural layout (head r = lanes [r*P, (r+1)*P)), or
             (hb, Q, P)   head-major fallback; heads of one head block share the group g
  B, C       (Q, N)       per group
  rows       (hb, 8, Q)   per-token vectors, one per sublane, dense (8, 128) tiles in HBM:
                          [Acs, dt, wexp, e, decay, 0, 0, 0] with
                          wexp = exp(min(Acs_end - Acs, 0)) masked to the chunk's last segment,
                          e = exp(Acs) masked to the segment entering the chunk,
                          decay = exp(Acs_end) * keep (same value in every lane).
                          The kernel transposes the (8, Q) tile once per head to get the
                          (Q, 1) column vectors (an XLU transpose; a (Q, k) HBM layout would be
                          padded to 128 lanes, 25x the bytes).
  seg_row    (1, Q)       float run indices (only with segment ids); column by transpose
  state      (hb, P, N)   fp32, N = d_state on the lanes: (P, 64) states would pad to 128 lanes
  drows      (hb, 8, Q)   backward per-token outputs [d dt, row, col, st, carried, 0, 0, 0] of
                          the cancellation-free log-decay gradient (pallas_kernels/log_decay.py)

All Q x Q exponentials take ``where(mask, Acs_l - Acs_s, -inf)`` clamped to <= 0, so the
masked entries are exp(-inf) = 0 and no inf can appear. MXU operands are in the input dtype
(bf16 stays bf16), accumulation is fp32 (``preferred_element_type``); elementwise work is
fp32. One product is computed to fp32 accuracy: dMᵀ = (dt x) dyᵀ, whose entries feed the pair
sums of the cancellation-free log-decay gradient (see ``_pair_mm``); the rows-minus-columns
form it replaces had a dA error of 7.5e-1 with bf16 inputs at chunk 256 (now 6.5e-4, the
``xla`` path's 6.6e-4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["Grid", "ssd_fwd_call", "ssd_bwd_call", "NCOLS", "vmem_bytes"]

NCOLS = 8  # sublanes of the per-token rows: Acs, dt, wexp, e, decay, 0, 0, 0
_ACS, _DT, _WEXP, _E, _DECAY = range(5)
_DDT, _ROW, _COL, _ST, _CARRIED = range(5)  # sublanes of the backward's drows

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Grid:
  """Static geometry: b sequences, G groups, R heads per group in blocks of hb heads, split
  over ``split`` cores (split divides R // hb); T chunks of Q; P headdim (None: head-major
  layout, else the packed layout's lanes per head), N d_state."""

  b: int
  G: int
  R: int
  hb: int
  split: int
  T: int
  Q: int
  P: int
  N: int
  packed: bool

  @property
  def J(self):  # head blocks per parallel unit
    return self.R // self.hb // self.split

  @property
  def units(self):  # the leading "parallel" axis: (batch, group, core split)
    return self.b * self.G * self.split

  def bgs(self, u):
    return u // (self.G * self.split), (u // self.split) % self.G, u % self.split

  def hblk(self, u, j):
    """Global head-block index (units of hb heads) of head block j of unit u."""
    _, g, sp = self.bgs(u)
    return g * (self.R // self.hb) + sp * self.J + j

  def x_spec(self, chunk):
    """BlockSpec of x / y / dy / dx; ``chunk(t)`` maps the grid's chunk index."""
    S_ = pl.Squeezed()
    if self.packed:
      return pl.BlockSpec(
        (S_, self.Q, self.hb * self.P), lambda u, t, j: (self.bgs(u)[0], chunk(t), self.hblk(u, j))
      )
    return pl.BlockSpec(
      (S_, self.hb, self.Q, self.P), lambda u, t, j: (self.bgs(u)[0], self.hblk(u, j), chunk(t), 0)
    )

  def group_spec(self, chunk):
    """(Q, N) blocks of B / C: constant over head blocks (fetched once per chunk)."""
    S_ = pl.Squeezed()
    return pl.BlockSpec(
      (S_, S_, self.Q, self.N), lambda u, t, j: (self.bgs(u)[0], self.bgs(u)[1], chunk(t), 0)
    )

  def head_chunk_spec(self, chunk, tail):
    """(hb, *tail) blocks of a (b, H, T, *tail) array: rows, prev, drows."""
    S_ = pl.Squeezed()
    return pl.BlockSpec(
      (S_, self.hb, S_, *tail), lambda u, t, j: (self.bgs(u)[0], self.hblk(u, j), chunk(t), 0, 0)
    )

  def state_spec(self, at_step):
    """(hb, P, N) blocks of a (b, H, P, N) state read or written at grid chunk step
    ``at_step`` only: at other steps the block index stays on one block, so the pipeline
    neither refetches nor writes it back once per chunk."""
    S_ = pl.Squeezed()
    last = self.J - 1 if at_step == 0 else 0

    def index(u, t, j):
      jj = jnp.where(t == at_step, j, last)
      return self.bgs(u)[0], self.hblk(u, jj), 0, 0

    return pl.BlockSpec((S_, self.hb, self.P, self.N), index)

  def unit_spec(self, chunk):
    """(Q, N) dB / dC blocks of a (b, G*split, Lp, N) array: resident over head blocks."""
    S_ = pl.Squeezed()
    return pl.BlockSpec(
      (S_, S_, self.Q, self.N),
      lambda u, t, j: (self.bgs(u)[0], u % (self.G * self.split), chunk(t), 0),
    )

  def skip_spec(self):
    """Blocks of D per lane: (1, hb*P) of (1, H*P) packed, (hb, 1, P) of (H, 1, P)."""
    if self.packed:
      return pl.BlockSpec((1, self.hb * self.P), lambda u, t, j: (0, self.hblk(u, j)))
    return pl.BlockSpec((self.hb, 1, self.P), lambda u, t, j: (self.hblk(u, j), 0, 0))

  def skip_grad_spec(self, chunk):
    """Per-chunk dD partials: (1, hb*P) of (b, T, 1, H*P) packed, (hb, 1, P) of
    (b, H, T, 1, P) head-major."""
    S_ = pl.Squeezed()
    if self.packed:
      return pl.BlockSpec(
        (S_, S_, 1, self.hb * self.P),
        lambda u, t, j: (self.bgs(u)[0], chunk(t), 0, self.hblk(u, j)),
      )
    return pl.BlockSpec(
      (S_, self.hb, S_, 1, self.P),
      lambda u, t, j: (self.bgs(u)[0], self.hblk(u, j), chunk(t), 0, 0),
    )

  def skip_grad_shape(self):
    H = self.G * self.R
    if self.packed:
      return (self.b, self.T, 1, H * self.P)
    return (self.b, H, self.T, 1, self.P)

  def seg_spec(self, chunk):
    S_ = pl.Squeezed()
    return pl.BlockSpec((S_, S_, 1, self.Q), lambda u, t, j: (self.bgs(u)[0], chunk(t), 0, 0))


def vmem_bytes(Q, hb, P, N, J, itemsize, *, backward):
  """Upper estimate of a program's VMEM: double-buffered blocks, scratch and the largest live
  per-head temporaries (Q x Q fp32 matrices); used to choose the head block."""
  xblk = Q * hb * P
  io = 2 * (2 if backward else 1) * xblk * itemsize + 2 * xblk * (itemsize if backward else 4)
  io += 2 * 2 * Q * N * itemsize + 2 * hb * NCOLS * Q * 4 * (2 if backward else 1)
  io += 2 * hb * P * N * 4 * (2 if backward else 2)  # prev (and h0/hT or dhT/dh0) blocks
  if backward:
    io += 2 * 2 * Q * N * 4 * 2  # dB, dC resident output blocks and fp32 accumulators
  scratch = J * hb * P * N * 4 + Q * Q * 4 * (2 if backward else 1)
  temps = Q * Q * 4 * (6 if backward else 3) + 6 * Q * P * 4 + 2 * P * N * 4
  return io + scratch + temps


def _mm(a, b, dims, cd):
  """fp32-accumulated matmul with operands cast to the compute dtype ``cd``."""
  prec = lax.Precision.HIGHEST if cd == F32 else None
  return lax.dot_general(
    a.astype(cd), b.astype(cd), dims, precision=prec, preferred_element_type=F32
  )


def _pair_mm(xdt, dy, dy_dtype, cd):
  """dMᵀ = (dt x) dyᵀ to about fp32 accuracy: its entries feed the pair sums of the log-decay
  gradient, which cancel when the decay is weak (bf16 operands: dA error 2.8e-2 there, 3.8x
  the xla path's). With bf16 operands and a bf16 dy (the cotangent of a bf16 y is exact in
  bf16), dt x is split into bf16 high and low parts: two bf16 MXU passes instead of the six
  of an fp32 Precision.HIGHEST product."""
  if cd == F32 or dy_dtype != jnp.bfloat16:
    return _mm(xdt, dy, _NT, F32)
  hi = xdt.astype(cd)
  lo = (xdt - hi.astype(F32)).astype(cd)
  return _mm(hi, dy, _NT, cd) + _mm(lo, dy, _NT, cd)


def _causal(Q, transposed, strict=False):
  r = lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
  c = lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
  if transposed:  # [s, l]
    r, c = c, r
  return (c < r) if strict else (c <= r)  # [l, s]: s <= l


def _seg_eq(Q, seg_row_ref):
  srow = seg_row_ref[...]  # (1, Q)
  scol = jnp.transpose(jnp.broadcast_to(srow, (8, Q)))[:, 0:1]  # (Q, 1)
  return scol == srow  # symmetric: serves [l, s] and [s, l]


def _decay_qq(acs_c, acs_r, mask, transposed):
  """exp(Acs_l - Acs_s) masked before exp; [l, s] or transposed [s, l]."""
  diff = (acs_c - acs_r) if not transposed else (acs_r - acs_c)
  diff = jnp.where(mask, jnp.minimum(diff, 0.0), -jnp.inf)
  return jnp.exp(diff)


def _ld(ref, r, P, packed):
  """Head r of a per-head block: (hb, Q, P) blocks, or (Q, hb*P) in the packed layout."""
  return ref[:, r * P : (r + 1) * P] if packed else ref[r]


def _st(ref, r, P, packed, val):
  if packed:
    ref[:, r * P : (r + 1) * P] = val
  else:
    ref[r] = val


def _loop_heads(hb, packed, body, init):
  """Static unroll in the packed layout (lane offsets must be static), else fori_loop."""
  if not packed:
    return lax.fori_loop(0, hb, body, init)
  carry = init
  for r in range(hb):
    carry = body(r, carry)
  return carry


def _head_vectors(rows_ref, r):
  """(Q, 1) columns acs, dt, wexp, e; (1, 1) decay; (1, Q) acs row of head r."""
  rows = rows_ref[r]  # (NCOLS, Q)
  cols = jnp.transpose(rows)  # (Q, NCOLS)
  col = lambda i: cols[:, i : i + 1]  # noqa: E731
  return (
    col(_ACS),
    col(_DT),
    col(_WEXP),
    col(_E),
    cols[0:1, _DECAY : _DECAY + 1],
    rows[_ACS : _ACS + 1],
  )


def _nbytes(*arrs):
  return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrs if a is not None))


def _call(kernel, name, g, in_specs, out_specs, out_shape, scratch, args, flops, interpret):
  cost = pl.CostEstimate(
    flops=int(flops),
    transcendentals=int(g.b * g.G * g.R * g.T * g.Q**2),
    bytes_accessed=_nbytes(*args) + _nbytes(*out_shape),
  )
  return pl.pallas_call(
    kernel,
    grid=(g.units, g.T, g.J),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary", "arbitrary")
    ),
    interpret=interpret,
    cost_estimate=cost,
    name=name,
  )(*args)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, g: Grid, cd, has_seg, save_states):
  it = iter(refs)
  x_ref, d_ref, c_ref, b_ref, rows_ref, h0_ref = (next(it) for _ in range(6))
  seg_row_ref = next(it) if has_seg else None
  y_ref, hT_ref = next(it), next(it)
  prev_ref = next(it) if save_states else None
  state, cb_scr = next(it), next(it)  # VMEM (J, hb, P, N) fp32, (Q, Q) fp32
  Q, P, hb = g.Q, g.P, g.hb
  t, j = pl.program_id(1), pl.program_id(2)

  @pl.when(t == 0)
  def _init():
    state[j] = h0_ref[...].astype(F32)

  mask = _causal(Q, transposed=False)
  if has_seg:
    mask = jnp.logical_and(mask, _seg_eq(Q, seg_row_ref))
  C = c_ref[...]
  Bm = b_ref[...]

  @pl.when(j == 0)
  def _cb():  # once per (chunk, group): C Bᵀ, shared by every head block
    cb_scr[...] = jnp.where(mask, _mm(C, Bm, _NT, cd), 0.0)

  CBm = cb_scr[...]

  def head(r, carry):
    acs_c, dt_c, wexp_c, e_c, decay, acs_r = _head_vectors(rows_ref, r)
    x = _ld(x_ref, r, P, g.packed).astype(F32)  # (Q, P)
    h = state[j, r]  # (P, N) fp32: state entering this chunk
    if save_states:
      prev_ref[r] = h
    M = _decay_qq(acs_c, acs_r, mask, transposed=False) * CBm
    y = _mm(M, x * dt_c, _NN, cd) + e_c * _mm(C, h, _NT, cd) + _ld(d_ref, r, P, g.packed) * x
    _st(y_ref, r, P, g.packed, y.astype(y_ref.dtype))
    S = _mm(x * (dt_c * wexp_c), Bm, _TN, cd)  # (P, N)
    state[j, r] = decay * h + S
    return carry

  _loop_heads(hb, g.packed, head, 0)

  @pl.when(t == g.T - 1)
  def _fin():
    hT_ref[...] = state[j].astype(hT_ref.dtype)


def ssd_fwd_call(x, D, C, Bm, rows, h0, seg_row, *, g: Grid, out_dtype, cd, save_states, interpret):
  """x (b,H,Lp,P), or packed (b,Lp,H*P); D the skip per lane, fp32 (H,1,P) or packed
  (1,H*P); C, Bm (b,G,Lp,N); rows (b,H,T,NCOLS,Q) fp32; h0 (b,H,P,N) fp32; seg_row
  (b,T,1,Q) float32 or None.

  Returns y (like x, with the D skip) in out_dtype, the final state (b,H,P,N) fp32 and,
  with save_states, the states entering every chunk (b,H,T,P,N) fp32.
  """
  ident = lambda t: t  # noqa: E731
  H = g.G * g.R
  xspec = g.x_spec(ident)
  in_specs = [
    xspec,
    g.skip_spec(),
    g.group_spec(ident),
    g.group_spec(ident),
    g.head_chunk_spec(ident, (NCOLS, g.Q)),
    g.state_spec(0),
  ]
  args = [x, D, C, Bm, rows, h0]
  if seg_row is not None:
    in_specs.append(g.seg_spec(ident))
    args.append(seg_row)
  out_specs = [xspec, g.state_spec(g.T - 1)]
  out_shape = [
    jax.ShapeDtypeStruct(x.shape, out_dtype),
    jax.ShapeDtypeStruct((g.b, H, g.P, g.N), F32),
  ]
  if save_states:
    out_specs.append(g.head_chunk_spec(ident, (g.P, g.N)))
    out_shape.append(jax.ShapeDtypeStruct((g.b, H, g.T, g.P, g.N), F32))
  kernel = functools.partial(
    _fwd_kernel, g=g, cd=cd, has_seg=seg_row is not None, save_states=save_states
  )
  Q, P, N = g.Q, g.P, g.N
  flops = g.b * g.T * (g.G * g.split * 2 * Q * Q * N + H * (2 * Q * Q * P + 4 * Q * N * P))
  scratch = [pltpu.VMEM((g.J, g.hb, P, N), F32), pltpu.VMEM((Q, Q), F32)]
  return _call(
    kernel, "ssd_tpu_fwd", g, in_specs, out_specs, out_shape, scratch, args, flops, interpret
  )


# ----------------------------------------------------------------------------- backward


def _bwd_kernel(*refs, g: Grid, cd, has_seg):
  it = iter(refs)
  x_ref, dy_ref, d_ref, c_ref, b_ref, rows_ref, prev_ref, dhT_ref = (next(it) for _ in range(8))
  seg_row_ref = next(it) if has_seg else None
  dx_ref, dd_ref, drows_ref, dB_ref, dC_ref, dh0_ref = (next(it) for _ in range(6))
  g_scr, cbt_scr, dcbt_scr, dbc_scr = next(it), next(it), next(it), next(it)
  Q, P, hb = g.Q, g.P, g.hb
  s, j = pl.program_id(1), pl.program_id(2)  # chunk t = T - 1 - s: chunks visited in reverse

  @pl.when(s == 0)
  def _init():
    g_scr[j] = dhT_ref[...].astype(F32)

  maskT = _causal(Q, transposed=True)  # [s, l]
  strictT = _causal(Q, transposed=True, strict=True)
  if has_seg:
    eq = _seg_eq(Q, seg_row_ref)
    maskT, strictT = jnp.logical_and(maskT, eq), jnp.logical_and(strictT, eq)
  C = c_ref[...]
  Bm = b_ref[...]

  @pl.when(j == 0)
  def _first():  # once per (chunk, group): B Cᵀ; zero the accumulators
    cbt_scr[...] = jnp.where(maskT, _mm(Bm, C, _NT, cd), 0.0)
    dcbt_scr[...] = jnp.zeros_like(dcbt_scr)
    dbc_scr[...] = jnp.zeros_like(dbc_scr)

  CBmT = cbt_scr[...]  # (Q(s), Q(l))
  CBsT = jnp.where(strictT, CBmT, 0.0)  # off the diagonal: the log-decay pair terms
  lane8 = lax.broadcasted_iota(jnp.int32, (Q, NCOLS), 1)
  sub8 = lax.broadcasted_iota(jnp.int32, (NCOLS, Q), 0)

  def head(r, carry):
    dB_acc, dC_acc = carry
    acs_c, dt_c, wexp_c, e_c, decay, acs_r = _head_vectors(rows_ref, r)
    x = _ld(x_ref, r, P, g.packed).astype(F32)
    dy = _ld(dy_ref, r, P, g.packed).astype(F32)
    h = prev_ref[r]  # (P, N) state entering the chunk
    dS = g_scr[j, r]  # (P, N) gradient w.r.t. the state leaving the chunk
    xdt = x * dt_c
    xw = xdt * wexp_c

    # state -> output
    dyo = dy * e_c
    row_off = e_c * jnp.sum(dy * _mm(C, h, _NT, cd), axis=1, keepdims=True)  # dy . y_off
    dprev = _mm(dyo, C, _TN, cd)  # (P, N)
    dC_acc = dC_acc + _mm(dyo, h, _NN, cd)  # (Q, N)

    # chunk state and the carried decay
    dxw = _mm(Bm, dS, _NT, cd)  # (Q, P)
    dB_acc = dB_acc + _mm(xw, dS, _NN, cd)  # (Q, N)
    carried = decay * jnp.sum(jnp.sum(dS * h, axis=1, keepdims=True), axis=0, keepdims=True)

    # diagonal block in transposed [s, l] order, decay recomputed
    LT = _decay_qq(acs_c, acs_r, maskT, transposed=True)
    dxdt = _mm(LT * CBmT, dy, _NN, cd)  # (Q(s), P)
    dLT = _pair_mm(xdt, dy, dy_ref.dtype, cd) * LT  # dMᵀ o Lᵀ
    dcbt_scr[...] += dLT
    GT = dLT * CBsT
    row = jnp.sum(GT, axis=0, keepdims=True)  # (1, Q(l)): pairs s < l
    col = jnp.sum(GT, axis=1, keepdims=True)  # (Q(s), 1): pairs l > s

    V = dxdt + dxw * wexp_c
    _st(dx_ref, r, P, g.packed, (V * dt_c + _ld(d_ref, r, P, g.packed) * dy).astype(dx_ref.dtype))
    _st(dd_ref, r, P, g.packed, jnp.sum(dy * x, axis=0, keepdims=True))
    ddt = jnp.sum(V * x, axis=1, keepdims=True)  # (Q, 1)
    st = jnp.sum(xw * dxw, axis=1, keepdims=True)  # (Q, 1)
    colmat = jnp.where(
      lane8 == _DDT,
      ddt,
      jnp.where(
        lane8 == _ROW, row_off, jnp.where(lane8 == _COL, col, jnp.where(lane8 == _ST, st, 0.0))
      ),
    )
    drows_ref[r] = (
      jnp.transpose(colmat)
      + jnp.where(sub8 == _ROW, row, 0.0)
      + jnp.where(sub8 == _CARRIED, carried, 0.0)
    )
    g_scr[j, r] = dprev + decay * dS
    return dB_acc, dC_acc

  zeros = jnp.zeros((Q, g.N), F32)
  dB_acc, dC_acc = _loop_heads(hb, g.packed, head, (zeros, zeros))
  dbc_scr[0] += dB_acc
  dbc_scr[1] += dC_acc

  @pl.when(j == g.J - 1)
  def _diag():  # the diagonal blocks' dB, dC from the head-summed dCBᵀ
    dCBT = jnp.where(maskT, dcbt_scr[...], 0.0)
    dB_ref[...] = (dbc_scr[0] + _mm(dCBT, C, _NN, cd)).astype(dB_ref.dtype)
    dC_ref[...] = (dbc_scr[1] + _mm(dCBT, Bm, _TN, cd)).astype(dC_ref.dtype)

  @pl.when(s == g.T - 1)
  def _fin():
    dh0_ref[...] = g_scr[j]


def ssd_bwd_call(x, dy, D, C, Bm, rows, prev, dhT, seg_row, *, g: Grid, cd, dx_dtype, interpret):
  """Backward of :func:`ssd_fwd_call`. dy like x; prev (b,H,T,P,N); dhT (b,H,P,N).

  Returns dx (like x, dx_dtype), the per-chunk partials of dD (Grid.skip_grad_shape), drows
  (b,H,T,NCOLS,Q) fp32 = [d dt, row, col, st, carried] per token (pallas_kernels/log_decay.py),
  dB, dC (b, G*split, Lp, N) summed over the heads of each core split (accumulated in fp32;
  written in B's dtype when split = 1, so they are the final dB, dC; fp32 partials for XLA to
  sum otherwise), dh0 (b,H,P,N) fp32.
  """
  rt = lambda t: g.T - 1 - t  # noqa: E731
  H = g.G * g.R
  xspec = g.x_spec(rt)
  in_specs = [
    xspec,
    xspec,
    g.skip_spec(),
    g.group_spec(rt),
    g.group_spec(rt),
    g.head_chunk_spec(rt, (NCOLS, g.Q)),
    g.head_chunk_spec(rt, (g.P, g.N)),
    g.state_spec(0),
  ]
  args = [x, dy, D, C, Bm, rows, prev, dhT]
  if seg_row is not None:
    in_specs.append(g.seg_spec(rt))
    args.append(seg_row)
  out_specs = [
    xspec,
    g.skip_grad_spec(rt),
    g.head_chunk_spec(rt, (NCOLS, g.Q)),
    g.unit_spec(rt),
    g.unit_spec(rt),
    g.state_spec(g.T - 1),
  ]
  Lp = g.T * g.Q
  dbc_dtype = Bm.dtype if g.split == 1 else F32
  out_shape = [
    jax.ShapeDtypeStruct(x.shape, dx_dtype),
    jax.ShapeDtypeStruct(g.skip_grad_shape(), F32),
    jax.ShapeDtypeStruct((g.b, H, g.T, NCOLS, g.Q), F32),
    jax.ShapeDtypeStruct((g.b, g.G * g.split, Lp, g.N), dbc_dtype),
    jax.ShapeDtypeStruct((g.b, g.G * g.split, Lp, g.N), dbc_dtype),
    jax.ShapeDtypeStruct((g.b, H, g.P, g.N), F32),
  ]
  kernel = functools.partial(_bwd_kernel, g=g, cd=cd, has_seg=seg_row is not None)
  Q, P, N = g.Q, g.P, g.N
  flops = g.b * g.T * (g.G * g.split * 6 * Q * Q * N + H * (4 * Q * Q * P + 12 * Q * N * P))
  scratch = [
    pltpu.VMEM((g.J, g.hb, P, N), F32),
    pltpu.VMEM((Q, Q), F32),
    pltpu.VMEM((Q, Q), F32),
    pltpu.VMEM((2, Q, N), F32),
  ]
  return _call(
    kernel, "ssd_tpu_bwd", g, in_specs, out_specs, out_shape, scratch, args, flops, interpret
  )
