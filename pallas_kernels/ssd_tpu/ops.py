"""``ssd_tpu_core``: layouts, padding and the ``jax.custom_vjp`` around the Mosaic kernels.

The prologue here (padding after the dt prologue, Acs = cumsum(dA) in fp32 with the per-token
log-decay dA = dt * A + log_decay_offset of the shared prologue (``prep.dA``), transposes to
head-major layouts) is plain XLA and differentiated by XLA; the custom VJP covers only
(x, dt, Acs, B, C, h0) -> (y, final state), with both directions in Pallas (kernel.py).
Per-token factors (wexp, e, chunk decay, segment masks) are cheap (b, H, L) vectors computed
by XLA in both the forward and the backward rule (recomputed, never stored).

It imports only ``mamba2_jax.ssd.common`` (jax-only) from the project; ``prep`` is duck-typed
(``mamba2_jax.ssd.common.Prepared``: x, dt, A, B, C, initial_state, seg, acc, dA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mamba2_jax.ssd.common import pad_axis
from pallas_kernels.platform import target_platform

from .kernel import ssd_bwd_call, ssd_fwd_call

__all__ = ["ssd_tpu_core", "pick_head_block", "chunk_len"]

MAX_HB_FWD = 8  # heads per program in the forward kernel (divisor of H // G)
MAX_HB_BWD = 4  # backward holds more blocks per head in VMEM


def _round_up(n, m):
    return -(-n // m) * m


def chunk_len(chunk_size: int, L: int) -> int:
    """Chunk actually used: a multiple of 8 sublanes, no longer than needed for L."""
    return min(_round_up(chunk_size, 8), _round_up(L, 8))


def pick_head_block(R: int, max_hb: int, lanes_of: int | None = None) -> int | None:
    """Largest divisor of R (heads per group) that is <= max_hb; with ``lanes_of=P`` only
    divisors d with d*P a multiple of 128 lanes qualify (None if there is none)."""
    for d in range(min(R, max_hb), 0, -1):
        if R % d == 0 and (lanes_of is None or (d * lanes_of) % 128 == 0):
            return d
    return None if lanes_of is not None else 1


def pick_layout(H: int, G: int, P: int, max_hb=None):
    """(hb_fwd, hb_bwd, packed): the packed (b, L, H*P) layout whenever both kernels get a
    head block of a multiple of 128 lanes (P = 64: even heads per group), else head-major."""
    mf, mb = max_hb or (MAX_HB_FWD, MAX_HB_BWD)
    R = H // G
    pf, pb = pick_head_block(R, mf, P), pick_head_block(R, mb, P)
    if pf is not None and pb is not None:
        return pf, pb, True
    return pick_head_block(R, mf), pick_head_block(R, mb), False


def _per_token(dt, Acs, seg):
    """dt, Acs (b,H,T,Q) fp32; seg (b,T,Q) int32 or None -> kernel vectors.

    Returns rows (b,H,T,8,Q) = [Acs, dt, wexp, e, decay, 0, 0, 0] and the float segment row
    layout (b,T,1,Q) (or None).
    """
    wexp = jnp.exp(jnp.minimum(Acs[..., -1:] - Acs, 0.0))
    e = jnp.exp(jnp.minimum(Acs, 0.0))
    decay = jnp.exp(jnp.minimum(Acs[..., -1:], 0.0))
    seg_row = None
    if seg is not None:
        seg_end = seg[:, :, -1]  # (b,T)
        seg_prev = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)
        state_m = (seg == seg_end[..., None])[:, None]  # (b,1,T,Q)
        off_m = (seg == seg_prev[..., None])[:, None]
        keep = (seg_end == seg_prev)[:, None, :, None]  # (b,1,T,1)
        wexp = jnp.where(state_m, wexp, 0.0)
        e = jnp.where(off_m, e, 0.0)
        decay = jnp.where(keep, decay, 0.0)
        segf = seg.astype(jnp.float32)  # exact for run indices < 2**24
        seg_row = segf[:, :, None, :]
    decay = jnp.broadcast_to(decay, Acs.shape)
    z = jnp.zeros_like(Acs)
    rows = jnp.stack([Acs, dt, wexp, e, decay, z, z, z], axis=-2)
    return rows, seg_row


def _chunk_t(t, T):
    """(b,G,Lp,N) -> (b,G,T,N,Q): per-chunk transposed copy for NN state GEMMs."""
    b, G, Lp, N = t.shape
    return jnp.swapaxes(t.reshape(b, G, T, Lp // T, N), -1, -2)


def _compute_dtype(*ts):
    return jnp.bfloat16 if all(t.dtype == jnp.bfloat16 for t in ts) else jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd_tpu(x, dt, Acs, Bq, Cq, h0, seg, cfg):
    y, hT, _ = _fwd(x, dt, Acs, Bq, Cq, h0, seg, cfg, save_states=False)
    return y, hT


def _fwd(x, dt, Acs, Bq, Cq, h0, seg, cfg, save_states):
    hb_f, _, interpret, Pp = cfg
    T = dt.shape[2]
    rows, seg_row = _per_token(dt, Acs, seg)
    outs = ssd_fwd_call(
        x, Cq, _chunk_t(Bq, T), rows, h0, seg_row,
        hb=hb_f, out_dtype=jnp.float32, cd=_compute_dtype(x, Bq, Cq),
        save_states=save_states, interpret=interpret, P=Pp,
    )
    if save_states:
        return outs
    return outs[0], outs[1], None


def _ssd_tpu_fwd(x, dt, Acs, Bq, Cq, h0, seg, cfg):
    y, hT, prev = _fwd(x, dt, Acs, Bq, Cq, h0, seg, cfg, save_states=True)
    return (y, hT), (x, dt, Acs, Bq, Cq, seg, prev)


def _ssd_tpu_bwd(cfg, res, cts):
    _, hb_b, interpret, Pp = cfg
    x, dt, Acs, Bq, Cq, seg, prev = res
    dy, dhT = cts
    b, H = dt.shape[:2]
    Lp = Bq.shape[2]
    G, N = Bq.shape[1], Bq.shape[3]
    T = dt.shape[2]
    nhb = (H // G) // hb_b
    rows, seg_row = _per_token(dt, Acs, seg)
    dx, drows, dB, dC, dh0 = ssd_bwd_call(
        x, dy.astype(jnp.float32), Cq, _chunk_t(Cq, T), Bq, _chunk_t(Bq, T), rows, prev,
        dhT.astype(jnp.float32), seg_row,
        hb=hb_b, cd=_compute_dtype(x, Bq, Cq), dx_dtype=x.dtype, interpret=interpret, P=Pp,
    )
    ddt = drows[..., 0, :]
    dAcs = drows[..., 1, :]
    dB = dB.reshape(b, G, nhb, Lp, N).sum(axis=2).astype(Bq.dtype)
    dC = dC.reshape(b, G, nhb, Lp, N).sum(axis=2).astype(Cq.dtype)
    dseg = None
    return dx, ddt, dAcs, dB, dC, dh0, dseg


_ssd_tpu.defvjp(_ssd_tpu_fwd, _ssd_tpu_bwd)


def ssd_tpu_core(prep, *, chunk_size: int = 256, interpret=None, max_hb=(MAX_HB_FWD, MAX_HB_BWD),
                 layout: str = "auto"):
    """SSD core on the Mosaic TPU kernels. Returns (y without D (b,L,H,P), final (b,H,P,N)),
    both in ``prep.acc``. ``interpret=None``: interpret mode on the CPU backend.
    ``layout``: "auto" (packed when possible), "packed" or "head_major" (tests)."""
    if interpret is None:
        interpret = target_platform() == "cpu"
    interpret = bool(interpret)
    acc = prep.acc
    x = prep.x
    b, L, H, P = x.shape
    G, N = prep.B.shape[-2:]
    R = H // G
    Q = chunk_len(chunk_size, L)
    T = -(-L // Q)
    Lp = T * Q
    f32 = jnp.float32
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        x = x.astype(f32)  # fp64 / fp16 inputs: the kernel computes in fp32
    Bq, Cq = prep.B, prep.C
    if Bq.dtype not in (jnp.bfloat16, jnp.float32):
        Bq, Cq = Bq.astype(f32), Cq.astype(f32)
    if Cq.dtype != Bq.dtype:
        Bq, Cq = Bq.astype(f32), Cq.astype(f32)

    # pad AFTER the dt prologue: dt = 0 and x = B = C = 0 are identity steps; segment ids are
    # edge-padded so padding never starts a new segment.
    hb_f, hb_b, packed = pick_layout(H, G, P, max_hb)
    if layout == "head_major":
        hb_f, hb_b, packed = pick_head_block(R, max_hb[0]), pick_head_block(R, max_hb[1]), False
    elif layout == "packed" and not packed:
        raise ValueError(f"ssd_tpu: no head block of a multiple of 128 lanes for H/G={R}, P={P}")
    if packed:  # natural layout, free reshape: (b, Lp, H*P), head block = hb*P lanes
        xt = pad_axis(x, Lp, 1).reshape(b, Lp, H * P)
    else:
        xt = jnp.transpose(pad_axis(x, Lp, 1), (0, 2, 1, 3))  # (b,H,Lp,P)
    dt = jnp.transpose(pad_axis(prep.dt.astype(f32), Lp, 1), (0, 2, 1)).reshape(b, H, T, Q)
    # per-token log-decay dt * A + log_decay_offset from the prologue (prep.dA), padded with 0
    dA = prep.dA if getattr(prep, "dA", None) is not None else prep.dt * prep.A
    dA = jnp.transpose(pad_axis(dA.astype(f32), Lp, 1), (0, 2, 1)).reshape(b, H, T, Q)
    Acs = jnp.cumsum(dA, axis=-1)  # fp32, XLA (differentiated by XLA)
    Bq = jnp.transpose(pad_axis(Bq, Lp, 1), (0, 2, 1, 3))  # (b,G,Lp,N)
    Cq = jnp.transpose(pad_axis(Cq, Lp, 1), (0, 2, 1, 3))
    if prep.initial_state is None:
        h0 = jnp.zeros((b, H, N, P), f32)
    else:
        h0 = jnp.swapaxes(prep.initial_state.astype(f32), -1, -2)  # (b,H,N,P)
    seg = None if prep.seg is None else pad_axis(prep.seg.astype(jnp.int32), Lp, 1, "edge").reshape(b, T, Q)

    cfg = (hb_f, hb_b, interpret, P if packed else None)
    y, hT = _ssd_tpu(xt, dt, Acs, Bq, Cq, h0, seg, cfg)
    if packed:
        y = y.reshape(b, Lp, H, P)[:, :L].astype(acc)
    else:
        y = jnp.transpose(y, (0, 2, 1, 3))[:, :L].astype(acc)
    final = jnp.swapaxes(hT, -1, -2).astype(acc)
    return y, final
