"""Mosaic TPU kernels of the chunked SSD: one fused forward and one fused backward kernel.

See the package docstring (``pallas_kernels/ssd_tpu/__init__.py``) for the design. Shapes
of one program (grid (b, G, head blocks, chunks), chunks last and "arbitrary"):

  x, y, dy, dx  (Q, hb*P) packed natural layout (head r = lanes [r*P, (r+1)*P)), or
             (hb, Q, P)   head-major fallback; heads of one head block share the group g
  C, B       (Q, N)       per group; Bt, Ct (N, Q) the same data transposed by XLA
  rows       (hb, 8, Q)   per-token vectors, one per sublane, dense (8, 128) tiles in HBM:
                          [Acs, dt, wexp, e, decay, 0, 0, 0] with
                          wexp = exp(min(Acs_end - Acs, 0)) masked to the chunk's last segment,
                          e = exp(Acs) masked to the segment entering the chunk,
                          decay = exp(Acs_end) * keep (same value in every lane).
                          The kernel transposes the (8, Q) tile once per head to get the
                          (Q, 1) column vectors (an XLU transpose; a (Q, k) HBM layout would be
                          padded to 128 lanes, 25x the bytes).
  seg_row    (1, Q)       float run indices (only with segment ids); column by transpose
  state      (hb, N, P)   fp32, transposed (N, P) so that every state GEMM is NN or NT.

All Q x Q exponentials take ``where(mask, Acs_l - Acs_s, -inf)`` clamped to <= 0, so the
masked entries are exp(-inf) = 0 and no inf can appear (docs/ssd.md sections 6 and 9).
MXU operands are in the input dtype (bf16 stays bf16), accumulation is fp32
(``preferred_element_type``); elementwise work is fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["ssd_fwd_call", "ssd_bwd_call", "NCOLS"]

NCOLS = 8  # sublanes of the per-token rows: Acs, dt, wexp, e, decay, 0, 0, 0
_ACS, _DT, _WEXP, _E, _DECAY = range(5)

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _mm(a, b, dims, cd):
    """fp32-accumulated matmul with operands cast to the compute dtype ``cd``."""
    prec = lax.Precision.HIGHEST if cd == jnp.float32 else None
    return lax.dot_general(
        a.astype(cd), b.astype(cd), dims, precision=prec, preferred_element_type=jnp.float32
    )


def _causal(Q, transposed):
    r = lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    c = lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    # [l, s]: s <= l ; transposed [s, l]: s <= l
    return (c <= r) if not transposed else (r <= c)


def _intra_mask(Q, seg_row_ref, transposed):
    m = _causal(Q, transposed)
    if seg_row_ref is not None:
        srow = seg_row_ref[...]  # (1, Q)
        scol = jnp.transpose(jnp.broadcast_to(srow, (8, Q)))[:, 0:1]  # (Q, 1)
        # equality is symmetric, so the same mask serves [l, s] and [s, l]
        m = jnp.logical_and(m, scol == srow)
    return m


def _decay_qq(acs_c, acs_r, mask, transposed):
    """exp(Acs_l - Acs_s) masked before exp; [l, s] or transposed [s, l]."""
    diff = (acs_c - acs_r) if not transposed else (acs_r - acs_c)
    diff = jnp.where(mask, jnp.minimum(diff, 0.0), -jnp.inf)
    return jnp.exp(diff)


def _ld(ref, r, P, packed):
    """Head r of a per-head block: (hb, Q, P) blocks, or (Q, hb*P) in the packed layout."""
    return ref[:, r * P:(r + 1) * P] if packed else ref[r]


def _st(ref, r, P, packed, val):
    if packed:
        ref[:, r * P:(r + 1) * P] = val
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


def _nbytes(*arrs):
    return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrs if a is not None))


def _cost(flops, trans, args, out_shape):
    """Tells XLA's scheduler what the opaque kernel costs (shows in cost_analysis too)."""
    return pl.CostEstimate(flops=int(flops), transcendentals=int(trans),
                           bytes_accessed=_nbytes(*args) + _nbytes(*out_shape))


def _dims(grid_dims_semantics=("parallel", "parallel", "parallel", "arbitrary")):
    return pltpu.CompilerParams(dimension_semantics=grid_dims_semantics)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, hb, Q, P, cd, has_seg, save_states, packed):
    it = iter(refs)
    x_ref, c_ref, bt_ref, rows_ref, h0_ref = (next(it) for _ in range(5))
    seg_row_ref = next(it) if has_seg else None
    y_ref, hT_ref = next(it), next(it)
    prev_ref = next(it) if save_states else None
    state = next(it)  # VMEM scratch (hb, N, P) fp32

    t = pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        state[...] = h0_ref[...].astype(jnp.float32)

    C = c_ref[...]
    Bt = bt_ref[...]
    mask = _intra_mask(Q, seg_row_ref, transposed=False)
    CBm = jnp.where(mask, _mm(C, Bt, _NN, cd), 0.0)  # (Q, Q) once per program

    def head(r, carry):
        rows = rows_ref[r]  # (NCOLS, Q)
        cols = jnp.transpose(rows)  # (Q, NCOLS)
        acs_c = cols[:, _ACS:_ACS + 1]
        dt_c = cols[:, _DT:_DT + 1]
        wexp_c = cols[:, _WEXP:_WEXP + 1]
        e_c = cols[:, _E:_E + 1]
        decay = cols[0:1, _DECAY:_DECAY + 1]  # (1, 1)
        acs_r = rows[_ACS:_ACS + 1]  # (1, Q)
        x = _ld(x_ref, r, P, packed).astype(jnp.float32)  # (Q, P)
        h = state[r]  # (N, P) fp32: state entering this chunk
        if save_states:
            prev_ref[r] = h
        M = _decay_qq(acs_c, acs_r, mask, transposed=False) * CBm
        y = _mm(M, x * dt_c, _NN, cd)
        y = y + e_c * _mm(C, h, _NN, cd)
        _st(y_ref, r, P, packed, y.astype(y_ref.dtype))
        S = _mm(Bt, x * (dt_c * wexp_c), _NN, cd)  # (N, P)
        state[r] = decay * h + S
        return carry

    _loop_heads(hb, packed, head, 0)

    @pl.when(t == pl.num_programs(3) - 1)
    def _fin():
        hT_ref[...] = state[...].astype(hT_ref.dtype)


def _sizes(x, C, Bt, hb, P):
    """(packed, b, H, Lp, P, G, N, T, Q, R, nhb) of the forward/backward call operands."""
    packed = P is not None
    if packed:
        b, Lp, HP = x.shape
        H = HP // P
    else:
        b, H, Lp, P = x.shape
    G, N, T = C.shape[1], C.shape[3], Bt.shape[2]
    R = H // G
    return packed, b, H, Lp, P, G, N, T, Lp // T, R, R // hb


def ssd_fwd_call(x, C, Bt, rows, h0, seg_row, *, hb, out_dtype, cd, save_states, interpret,
                 P=None):
    """x (b,H,Lp,P), or packed (b,Lp,H*P) when ``P`` is given (head block = hb*P lanes); C (b,G,Lp,N); Bt (b,G,T,N,Q); rows (b,H,T,NCOLS,Q) fp32;
    h0 (b,H,N,P) fp32; seg_row (b,T,1,Q) float32 or None.

    Returns y (b,H,Lp,P) out_dtype, final state (b,H,N,P) fp32 and, with save_states,
    the states entering every chunk (b,H,T,N,P) fp32.
    """
    packed, b, H, Lp, P, G, N, T, Q, R, nhb = _sizes(x, C, Bt, hb, P)
    has_seg = seg_row is not None
    S_ = pl.Squeezed()

    def hblk(bi, g, j, t):
        return g * nhb + j

    if packed:
        xspec = pl.BlockSpec((S_, Q, hb * P), lambda bi, g, j, t: (bi, t, hblk(bi, g, j, t)))
    else:
        xspec = pl.BlockSpec((S_, hb, Q, P), lambda bi, g, j, t: (bi, hblk(bi, g, j, t), t, 0))
    in_specs = [
        xspec,
        pl.BlockSpec((S_, S_, Q, N), lambda bi, g, j, t: (bi, g, t, 0)),
        pl.BlockSpec((S_, S_, S_, N, Q), lambda bi, g, j, t: (bi, g, t, 0, 0)),
        pl.BlockSpec((S_, hb, S_, NCOLS, Q), lambda bi, g, j, t: (bi, hblk(bi, g, j, t), t, 0, 0)),
        pl.BlockSpec((S_, hb, N, P), lambda bi, g, j, t: (bi, hblk(bi, g, j, t), 0, 0)),
    ]
    args = [x, C, Bt, rows, h0]
    if has_seg:
        in_specs.append(pl.BlockSpec((S_, S_, 1, Q), lambda bi, g, j, t: (bi, t, 0, 0)))
        args.append(seg_row)
    out_specs = [
        xspec,
        pl.BlockSpec((S_, hb, N, P), lambda bi, g, j, t: (bi, hblk(bi, g, j, t), 0, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(x.shape, out_dtype),
        jax.ShapeDtypeStruct((b, H, N, P), jnp.float32),
    ]
    if save_states:
        out_specs.append(
            pl.BlockSpec((S_, hb, S_, N, P), lambda bi, g, j, t: (bi, hblk(bi, g, j, t), t, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, H, T, N, P), jnp.float32))
    kernel = functools.partial(_fwd_kernel, hb=hb, Q=Q, P=P, cd=cd, has_seg=has_seg,
                               save_states=save_states, packed=packed)
    nch = b * H * T  # head-chunks
    flops = nch * (2 * Q * Q * P + 4 * Q * N * P + 2 * Q * Q * N / hb + 4 * Q * Q)
    cost = _cost(flops, nch * (Q * Q), args, out_shape)
    return pl.pallas_call(
        kernel,
        grid=(b, G, nhb, T),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((hb, N, P), jnp.float32)],
        compiler_params=_dims(),
        interpret=interpret,
        cost_estimate=cost,
        name="ssd_tpu_fwd",
    )(*args)


# ----------------------------------------------------------------------------- backward


def _bwd_kernel(*refs, hb, Q, P, cd, has_seg, packed):
    it = iter(refs)
    (x_ref, dy_ref, c_ref, ct_ref, b_ref, bt_ref, rows_ref, prev_ref,
     dhT_ref) = (next(it) for _ in range(9))
    seg_row_ref = next(it) if has_seg else None
    dx_ref, drows_ref, dB_ref, dC_ref, dh0_ref = (next(it) for _ in range(5))
    g_scr, dcbt_scr = next(it), next(it)

    s = pl.program_id(3)  # chunk t = T - 1 - s: chunks visited in reverse

    @pl.when(s == 0)
    def _init():
        g_scr[...] = dhT_ref[...].astype(jnp.float32)

    C = c_ref[...]
    Ct = ct_ref[...]
    Bm = b_ref[...]
    Bt = bt_ref[...]
    maskT = _intra_mask(Q, seg_row_ref, transposed=True)  # [s, l]
    CBmT = jnp.where(maskT, _mm(Bm, Ct, _NN, cd), 0.0)  # (Q(s), Q(l)) once per program
    dcbt_scr[...] = jnp.zeros_like(dcbt_scr)
    dB_acc = jnp.zeros(dB_ref.shape, jnp.float32)
    dC_acc = jnp.zeros(dC_ref.shape, jnp.float32)
    lane = lax.broadcasted_iota(jnp.int32, (1, Q), 1)
    lane8 = lax.broadcasted_iota(jnp.int32, (Q, NCOLS), 1)
    sub8 = lax.broadcasted_iota(jnp.int32, (NCOLS, Q), 0)

    def head(r, carry):
        dB_acc, dC_acc = carry
        rows = rows_ref[r]
        cols = jnp.transpose(rows)
        acs_c = cols[:, _ACS:_ACS + 1]
        dt_c = cols[:, _DT:_DT + 1]
        wexp_c = cols[:, _WEXP:_WEXP + 1]
        e_c = cols[:, _E:_E + 1]
        decay = cols[0:1, _DECAY:_DECAY + 1]
        acs_r = rows[_ACS:_ACS + 1]
        x = _ld(x_ref, r, P, packed).astype(jnp.float32)
        dy = _ld(dy_ref, r, P, packed).astype(jnp.float32)
        h = prev_ref[r]  # (N, P) state entering the chunk
        dS = g_scr[r]  # (N, P) gradient w.r.t. the state leaving the chunk

        xdt = x * dt_c
        xw = xdt * wexp_c
        # recompute the chunk state: state leaving the chunk, for d(Acs_end)
        S = _mm(Bt, xw, _NN, cd)
        h_next = decay * h + S
        dend = jnp.sum(jnp.sum(dS * h_next, axis=1, keepdims=True), axis=0, keepdims=True)  # (1,1)

        # state -> output
        Ch = _mm(C, h, _NN, cd)  # (Q, P)
        dyo = dy * e_c
        de_row = e_c * jnp.sum(dy * Ch, axis=1, keepdims=True)  # (Q,1): d Acs_l via e_l
        dprev = _mm(Ct, dyo, _NN, cd)  # (N, P)
        dC_acc = dC_acc + _mm(dyo, h, _NT, cd)  # (Q, N)

        # chunk states
        dxw = _mm(Bm, dS, _NN, cd)  # (Q, P)
        dB_acc = dB_acc + _mm(xw, dS, _NT, cd)  # (Q, N)

        # diagonal block in transposed [s, l] order, decay recomputed
        LT = _decay_qq(acs_c, acs_r, maskT, transposed=True)
        MT = LT * CBmT
        dxdt = _mm(MT, dy, _NN, cd)  # (Q(s), P)
        dMT = _mm(xdt, dy, _NT, cd)  # (Q(s), Q(l))
        dLMT = dMT * LT
        dcbt_scr[...] += dLMT
        drow = jnp.sum(dLMT * CBmT, axis=0, keepdims=True)  # (1, Q(l)): d Acs_l via L rows

        V = dxdt + dxw * wexp_c
        _st(dx_ref, r, P, packed, (V * dt_c).astype(dx_ref.dtype))
        ddt = jnp.sum(V * x, axis=1, keepdims=True)  # (Q, 1)
        # [d dt, d Acs] as lane-dense rows: column parts transposed, row parts added to row 1
        colmat = jnp.where(lane8 == 0, ddt, jnp.where(lane8 == 1, de_row - dt_c * ddt, 0.0))
        drow = drow + jnp.where(lane == Q - 1, dend, 0.0)  # (1, Q)
        drows_ref[r] = jnp.transpose(colmat) + jnp.where(sub8 == 1, drow, 0.0)

        g_scr[r] = dprev + decay * dS
        return dB_acc, dC_acc

    dB_acc, dC_acc = _loop_heads(hb, packed, head, (dB_acc, dC_acc))
    dCBT = jnp.where(maskT, dcbt_scr[...], 0.0)
    dB_ref[...] = dB_acc + _mm(dCBT, C, _NN, cd)
    dC_ref[...] = dC_acc + _mm(dCBT, Bm, _TN, cd)

    @pl.when(s == pl.num_programs(3) - 1)
    def _fin():
        dh0_ref[...] = g_scr[...]


def ssd_bwd_call(x, dy, C, Ct, Bm, Bt, rows, prev, dhT, seg_row, *, hb, cd, dx_dtype,
                 interpret, P=None):
    """Backward of :func:`ssd_fwd_call`. dy (b,H,Lp,P); Ct, Bt (b,G,T,N,Q); C, Bm (b,G,Lp,N);
    prev (b,H,T,N,P); dhT (b,H,N,P).

    Returns dx (b,H,Lp,P), drows (b,H,T,NCOLS,Q) with rows 0, 1 = d dt, d Acs (all terms),
    dB, dC as per-head-block
    partials (b, G*nhb, Lp, N) fp32, dh0 (b,H,N,P) fp32.
    """
    packed, b, H, Lp, P, G, N, T, Q, R, nhb = _sizes(x, C, Bt, hb, P)
    has_seg = seg_row is not None
    S_ = pl.Squeezed()

    def rt(t):
        return T - 1 - t

    def hblk(g, j):
        return g * nhb + j

    if packed:
        xspec = pl.BlockSpec((S_, Q, hb * P), lambda bi, g, j, t: (bi, rt(t), hblk(g, j)))
    else:
        xspec = pl.BlockSpec((S_, hb, Q, P), lambda bi, g, j, t: (bi, hblk(g, j), rt(t), 0))
    gq = lambda bi, g, j, t: (bi, g, rt(t), 0)
    gt = lambda bi, g, j, t: (bi, g, rt(t), 0, 0)
    ht = lambda bi, g, j, t: (bi, hblk(g, j), rt(t), 0, 0)
    hs = lambda bi, g, j, t: (bi, hblk(g, j), 0, 0)
    in_specs = [
        xspec,  # x
        xspec,  # dy
        pl.BlockSpec((S_, S_, Q, N), gq),  # C
        pl.BlockSpec((S_, S_, S_, N, Q), gt),  # Ct
        pl.BlockSpec((S_, S_, Q, N), gq),  # B
        pl.BlockSpec((S_, S_, S_, N, Q), gt),  # Bt
        pl.BlockSpec((S_, hb, S_, NCOLS, Q), ht),  # rows
        pl.BlockSpec((S_, hb, S_, N, P), ht),  # prev
        pl.BlockSpec((S_, hb, N, P), hs),  # dhT
    ]
    args = [x, dy, C, Ct, Bm, Bt, rows, prev, dhT]
    if has_seg:
        in_specs.append(pl.BlockSpec((S_, S_, 1, Q), lambda bi, g, j, t: (bi, rt(t), 0, 0)))
        args.append(seg_row)
    out_specs = [
        xspec,  # dx
        pl.BlockSpec((S_, hb, S_, NCOLS, Q), ht),  # drows
        pl.BlockSpec((S_, S_, Q, N), lambda bi, g, j, t: (bi, hblk(g, j), rt(t), 0)),  # dB
        pl.BlockSpec((S_, S_, Q, N), lambda bi, g, j, t: (bi, hblk(g, j), rt(t), 0)),  # dC
        pl.BlockSpec((S_, hb, N, P), hs),  # dh0
    ]
    out_shape = [
        jax.ShapeDtypeStruct(x.shape, dx_dtype),
        jax.ShapeDtypeStruct((b, H, T, NCOLS, Q), jnp.float32),
        jax.ShapeDtypeStruct((b, G * nhb, Lp, N), jnp.float32),
        jax.ShapeDtypeStruct((b, G * nhb, Lp, N), jnp.float32),
        jax.ShapeDtypeStruct((b, H, N, P), jnp.float32),
    ]
    kernel = functools.partial(_bwd_kernel, hb=hb, Q=Q, P=P, cd=cd, has_seg=has_seg,
                               packed=packed)
    nch = b * H * T
    flops = nch * (4 * Q * Q * P + 12 * Q * N * P + 6 * Q * Q * N / hb + 8 * Q * Q)
    cost = _cost(flops, nch * (Q * Q), args, out_shape)
    return pl.pallas_call(
        kernel,
        grid=(b, G, nhb, T),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((hb, N, P), jnp.float32), pltpu.VMEM((Q, Q), jnp.float32)],
        compiler_params=_dims(),
        interpret=interpret,
        cost_estimate=cost,
        name="ssd_tpu_bwd",
    )(*args)
