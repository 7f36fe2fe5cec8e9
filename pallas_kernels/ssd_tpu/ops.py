"""``ssd_tpu_core``: layouts, padding and the ``jax.custom_vjp`` around the Mosaic kernels.

The prologue here (padding after the dt prologue, the per-token log-decay dA = dt * A +
log_decay_offset of the shared prologue (``prep.dA``), transposes of B and C to (b, G, L, N))
is plain XLA and differentiated by XLA; the custom VJP covers (x, dt, dA, B, C, h0) ->
(y, final state), with both directions in Pallas (kernel.py) and the per-chunk cumsum
Acs = cumsum(dA) inside it, so that the gradient w.r.t. dA is assembled by the
cancellation-free rule of pallas_kernels/log_decay.py from the kernel's per-token terms.
Per-token factors (wexp, e, chunk decay, segment masks) are cheap (b, H, L) vectors computed
by XLA in both the forward and the backward rule (recomputed, never stored).

It imports only jax and this package; ``prep`` is duck-typed (like
``mamba2_jax.ssd.common.Prepared``: x, dt, A, B, C, initial_state, seg, acc, dA). What depends
on the target comes in as arguments: ``interpret`` and the core ``split`` (the SSD layer passes
``tensorcores(device kind)``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.log_decay import log_decay_grad
from pallas_kernels.padding import pad_axis

from .kernel import Grid, ssd_bwd_call, ssd_fwd_call, vmem_bytes

__all__ = [
  "ssd_tpu_core",
  "pick_head_block",
  "pick_layout",
  "chunk_len",
  "tensorcores",
  "core_split",
  "VMEM_BUDGET",
]

MAX_HB_FWD = 8  # heads per program in the forward kernel (divisor of H // G)
MAX_HB_BWD = 4  # backward holds more blocks per head in VMEM
VMEM_BUDGET = 16 * 2**20  # the smallest default scoped VMEM limit of the TPU generations


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


MEGACORE_KINDS = ("TPU v4", "TPU v5")  # two TensorCores behind one device ("TPU v5" = v5p)


def tensorcores(device_kind: str | None) -> int:
  """TensorCores behind one device of this kind: 2 on megacore chips (v4, v5p), else 1."""
  return 2 if device_kind in MEGACORE_KINDS else 1


def core_split(R: int, hb: int, split: int) -> int:
  """``split`` (the TensorCores to split over) when the group's R // hb head blocks divide
  evenly between them (the grid's one "parallel" axis is split across them), else 1."""
  return split if (R // hb) % split == 0 else 1


def fit_head_block(hb, R, Q, P, N, itemsize, *, backward, packed, budget=VMEM_BUDGET):
  """The largest head block <= hb (a divisor of R; a multiple of 128 lanes when packed) whose
  program fits the VMEM budget. Raises ValueError naming the sizes when none fits."""
  for d in range(hb, 0, -1):
    if R % d or (packed and (d * P) % 128):
      continue
    if vmem_bytes(Q, d, P, N, R // d, itemsize, backward=backward) <= budget:
      return d
  need = vmem_bytes(Q, 1, P, N, R, itemsize, backward=backward)
  raise ValueError(
    f"ssd_tpu: no head block fits the {budget / 2**20:.0f} MiB VMEM budget "
    f"({'backward' if backward else 'forward'}: chunk {Q}, headdim {P}, d_state {N}, "
    f"{R} heads per group need {need / 2**20:.1f} MiB with one head per block); use a "
    f"smaller chunk_size or impl='xla'"
  )


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


def _compute_dtype(*ts):
  return jnp.bfloat16 if all(t.dtype == jnp.bfloat16 for t in ts) else jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _ssd_tpu(x, dt, dA, Bq, Cq, h0, D, seg, cfg):
  y, hT, _ = _fwd(x, dt, dA, Bq, Cq, h0, D, seg, cfg, save_states=False)
  return y, hT


def _skip_layout(D, g):
  """D (H, P) fp32 -> the kernel's per-lane layout."""
  return D.reshape(1, -1) if g.packed else D[:, None, :]


def _fwd(x, dt, dA, Bq, Cq, h0, D, seg, cfg, save_states):
  gf, _, interpret = cfg
  rows, seg_row = _per_token(dt, jnp.cumsum(dA, axis=-1), seg)
  outs = ssd_fwd_call(
    x,
    _skip_layout(D, gf),
    Cq,
    Bq,
    rows,
    h0,
    seg_row,
    g=gf,
    out_dtype=x.dtype,
    cd=_compute_dtype(x, Bq, Cq),
    save_states=save_states,
    interpret=interpret,
  )
  return outs if save_states else (outs[0], outs[1], None)


def _ssd_tpu_fwd(x, dt, dA, Bq, Cq, h0, D, seg, cfg):
  y, hT, prev = _fwd(x, dt, dA, Bq, Cq, h0, D, seg, cfg, save_states=True)
  return (y, hT), (x, dt, dA, Bq, Cq, D, seg, prev)


def _ssd_tpu_bwd(cfg, res, cts):
  _, gb, interpret = cfg
  x, dt, dA, Bq, Cq, D, seg, prev = res
  dy, dhT = cts
  rows, seg_row = _per_token(dt, jnp.cumsum(dA, axis=-1), seg)
  dx, dD, drows, dB, dC, dh0 = ssd_bwd_call(
    x,
    dy,
    _skip_layout(D, gb),
    Cq,
    Bq,
    rows,
    prev,
    dhT.astype(jnp.float32),
    seg_row,
    g=gb,
    cd=_compute_dtype(x, Bq, Cq),
    dx_dtype=x.dtype,
    interpret=interpret,
  )
  ddA = log_decay_grad(drows[..., 1, :], drows[..., 2, :], drows[..., 3, :], drows[..., 4, 0])
  b, G, Lp, N = Bq.shape
  if gb.split > 1:  # fp32 partials, one per core split
    dB = dB.reshape(b, G, gb.split, Lp, N).sum(axis=2).astype(Bq.dtype)
    dC = dC.reshape(b, G, gb.split, Lp, N).sum(axis=2).astype(Cq.dtype)
  dD = jnp.sum(dD, axis=(0, 1, 2) if gb.packed else (0, 2, 3)).reshape(D.shape)
  return dx, drows[..., 0, :], ddA, dB, dC, dh0, dD, None


_ssd_tpu.defvjp(_ssd_tpu_fwd, _ssd_tpu_bwd)


def ssd_tpu_core(
  prep,
  *,
  chunk_size: int = 256,
  interpret=False,
  max_hb=(MAX_HB_FWD, MAX_HB_BWD),
  layout: str = "auto",
  split: int = 1,
  D=None,
):
  """SSD core on the Mosaic TPU kernels. Returns y (b,L,H,P) in the input dtype (x's, or
  fp32 for fp64 inputs), with the skip ``D`` ((H, P) in ``prep.acc``, or None) fused into
  the kernels, and the final state (b,H,P,N) in ``prep.acc``.

  ``interpret``: False (compile with Mosaic); True (interpret mode, e.g. on a CPU host); or a
  ``pltpu.InterpretParams`` (TPU interpret mode: race detection, NaN-poisoned uninitialised
  memory, ...), passed to ``pallas_call`` as given. ``layout``: "auto" (packed when
  possible), "packed" or "head_major" (tests). ``split``: the TensorCores each group's head
  blocks are split over where it divides them (:func:`core_split`; the SSD layer passes
  :func:`tensorcores` of the target's device kind: 2 on v4 / v5p, else 1).
  """
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
  if Bq.dtype not in (jnp.bfloat16, jnp.float32) or Cq.dtype != Bq.dtype:
    Bq, Cq = Bq.astype(f32), Cq.astype(f32)

  hb_f, hb_b, packed = pick_layout(H, G, P, max_hb)
  if layout == "head_major":
    hb_f, hb_b, packed = pick_head_block(R, max_hb[0]), pick_head_block(R, max_hb[1]), False
  elif layout == "packed" and not packed:
    raise ValueError(f"ssd_tpu: no head block of a multiple of 128 lanes for H/G={R}, P={P}")
  isz = x.dtype.itemsize
  hb_f = fit_head_block(hb_f, R, Q, P, N, isz, backward=False, packed=packed)
  hb_b = fit_head_block(hb_b, R, Q, P, N, isz, backward=True, packed=packed)

  def grid(hb):
    sp = core_split(R, hb, split)
    return Grid(b=b, G=G, R=R, hb=hb, split=sp, T=T, Q=Q, P=P, N=N, packed=packed)

  # pad AFTER the dt prologue: dt = 0, dA = 0 and x = B = C = 0 are identity steps; segment
  # ids are edge-padded so padding never starts a new segment.
  if packed:  # natural layout, free reshape: (b, Lp, H*P), head block = hb*P lanes
    xt = pad_axis(x, Lp, 1).reshape(b, Lp, H * P)
  else:
    xt = jnp.transpose(pad_axis(x, Lp, 1), (0, 2, 1, 3))  # (b,H,Lp,P)
  chunked = lambda v: jnp.transpose(pad_axis(v.astype(f32), Lp, 1), (0, 2, 1)).reshape(b, H, T, Q)  # noqa: E731
  dA = prep.dA if getattr(prep, "dA", None) is not None else prep.dt * prep.A
  Bq = jnp.transpose(pad_axis(Bq, Lp, 1), (0, 2, 1, 3))  # (b,G,Lp,N)
  Cq = jnp.transpose(pad_axis(Cq, Lp, 1), (0, 2, 1, 3))
  h0 = (
    jnp.zeros((b, H, P, N), f32) if prep.initial_state is None else prep.initial_state.astype(f32)
  )
  seg = (
    None
    if prep.seg is None
    else pad_axis(prep.seg.astype(jnp.int32), Lp, 1, "edge").reshape(b, T, Q)
  )

  D = jnp.zeros((H, P), f32) if D is None else D.astype(f32)
  y, hT = _ssd_tpu(
    xt, chunked(prep.dt), chunked(dA), Bq, Cq, h0, D, seg, (grid(hb_f), grid(hb_b), interpret)
  )
  if packed:
    y = y.reshape(b, Lp, H, P)[:, :L]
  else:
    y = jnp.transpose(y, (0, 2, 1, 3))[:, :L]
  return y, hT.astype(acc)
