"""Shared prologue for every SSD implementation.

Everything here is cheap elementwise work that XLA differentiates on its own:
dt preprocessing (bias, softplus, clip), dtype selection, group -> head mapping,
segment-id normalisation. Implementation cores receive
already-prepared tensors (see :func:`prepare_inputs`) so that a kernel with a
hand-written VJP only has to differentiate the scan itself.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "Prepared",
  "acc_dtype",
  "prepare_dt",
  "segment_runs",
  "expand_groups",
  "validate",
  "validate_mitigations",
  "is_count",
  "is_positive_finite",
  "prepare_inputs",
  "apply_skip",
]


def acc_dtype(*arrays) -> jnp.dtype:
  """Accumulation dtype: float64 if any floating input is float64, else float32."""
  for a in arrays:
    if a is not None and jnp.asarray(a).dtype == jnp.float64:
      return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def prepare_dt(dt, dt_bias=None, *, dt_softplus=True, dt_limit=(0.0, float("inf")), dtype=None):
  """dt_t = clip(softplus(dt_raw + dt_bias) if dt_softplus else dt_raw + dt_bias, *dt_limit).

  Computed in ``dtype`` (default: float32, or float64 when ``dt`` is float64).
  Padding of the sequence must happen *after* this function, with dt = 0.
  """
  if dtype is None:
    dtype = acc_dtype(dt, dt_bias)
  out = jnp.asarray(dt).astype(dtype)
  if dt_bias is not None:
    out = out + jnp.asarray(dt_bias).astype(dtype)
  if dt_softplus:
    out = jax.nn.softplus(out)  # logaddexp(x, 0): numerically stable
  lo, hi = float(dt_limit[0]), float(dt_limit[1])
  # softplus output is >= 0, so the default (0, inf) limit is a no-op there.
  need_lo = lo > -math.inf and not (dt_softplus and lo <= 0.0)
  need_hi = hi < math.inf
  if need_lo or need_hi:
    out = jnp.clip(out, lo if need_lo else None, hi if need_hi else None)
  return out


def segment_runs(segment_ids):
  """Map arbitrary segment ids (b, L) to monotone run indices (b, L) int32.

  A new run starts wherever the id differs from the previous position, so the
  result is 0 on the first run (the one ``initial_state`` applies to) and is
  nondecreasing. Cores only ever compare run indices for equality, which with
  monotone runs is equivalent to "no reset in between".
  """
  seg = jnp.asarray(segment_ids)
  change = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
  runs = jnp.cumsum(change, axis=1, dtype=jnp.int32)
  return jnp.concatenate([jnp.zeros((seg.shape[0], 1), jnp.int32), runs], axis=1)


def expand_groups(t, num_heads: int):
  """(..., G, N) -> (..., H, N) with head h using group h // (H // G)."""
  g = t.shape[-2]
  if g == num_heads:
    return t
  return jnp.repeat(t, num_heads // g, axis=-2)


def _shape(a):
  return tuple(jnp.shape(a))


def validate(x, dt, A, B, C, D, dt_bias, initial_state, segment_ids, chunk_size, dt_limit):
  """Check shapes/arguments and return (b, L, H, P, G, N). Raises ValueError."""
  if jnp.ndim(x) != 4:
    raise ValueError(f"ssd: x must have shape (batch, seqlen, nheads, headdim); got {_shape(x)}")
  b, L, H, P = _shape(x)
  if _shape(dt) != (b, L, H):
    raise ValueError(
      f"ssd: dt must have shape (batch, seqlen, nheads) = {(b, L, H)}; got {_shape(dt)}"
    )
  if _shape(A) != (H,):
    raise ValueError(f"ssd: A must have shape (nheads,) = {(H,)}; got {_shape(A)}")
  if jnp.ndim(B) != 4:
    raise ValueError(f"ssd: B must have shape (batch, seqlen, ngroups, dstate); got {_shape(B)}")
  G, N = _shape(B)[2:]
  if _shape(B)[:2] != (b, L):
    raise ValueError(
      f"ssd: B batch/seqlen {_shape(B)[:2]} do not match x {(b, L)} (B shape {_shape(B)})"
    )
  if _shape(C) != _shape(B):
    raise ValueError(f"ssd: C must have the same shape as B {_shape(B)}; got {_shape(C)}")
  if G < 1 or H % G != 0:
    raise ValueError(f"ssd: nheads ({H}) must be divisible by ngroups ({G})")
  if D is not None and _shape(D) not in ((H,), (H, P)):
    raise ValueError(
      f"ssd: D must have shape (nheads,) = {(H,)} or (nheads, headdim) = {(H, P)}; got {_shape(D)}"
    )
  if dt_bias is not None and _shape(dt_bias) != (H,):
    raise ValueError(f"ssd: dt_bias must have shape (nheads,) = {(H,)}; got {_shape(dt_bias)}")
  if initial_state is not None and _shape(initial_state) != (b, H, P, N):
    raise ValueError(
      f"ssd: initial_state must have shape (batch, nheads, headdim, dstate) = {(b, H, P, N)}; "
      f"got {_shape(initial_state)}"
    )
  if segment_ids is not None:
    if _shape(segment_ids) != (b, L):
      raise ValueError(
        f"ssd: segment_ids must have shape (batch, seqlen) = {(b, L)}; got {_shape(segment_ids)}"
      )
    if not jnp.issubdtype(jnp.asarray(segment_ids).dtype, jnp.integer):
      raise ValueError(
        f"ssd: segment_ids must be an integer array; got dtype {jnp.asarray(segment_ids).dtype}"
      )
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"ssd: chunk_size must be a positive int; got {chunk_size!r}")
  try:
    lo, hi = (float(v) for v in dt_limit)
  except (TypeError, ValueError):
    raise ValueError(f"ssd: dt_limit must be a pair of floats (lo, hi); got {dt_limit!r}") from None
  if not lo <= hi:
    raise ValueError(f"ssd: dt_limit must satisfy lo <= hi; got {dt_limit!r}")
  if L < 1:
    raise ValueError("ssd: seqlen must be >= 1")
  return b, L, H, P, G, N


def _concrete_scalar(v, name):
  """float(v) for a Python / concrete 0-d value, None for a tracer. Raises ValueError."""
  if jnp.ndim(v) != 0:
    raise ValueError(f"ssd: {name} must be a scalar; got shape {_shape(v)}")
  if isinstance(v, jax.core.Tracer):
    return None
  return float(v)


def is_count(v, minimum: int = 1) -> bool:
  """v is a Python int (not a bool) >= minimum: window lengths, block lengths, sizes."""
  return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def is_positive_finite(v: float) -> bool:
  """v (a float) is finite and > 0: the scales dt_scale and RRI's insertion scale c_b."""
  return math.isfinite(v) and v > 0


def validate_mitigations(dt_scale, log_decay_offset, window) -> None:
  """Check the state-collapse mitigation arguments of :func:`mamba2_jax.ssd.ssd`.

  dt_scale: scalar > 0 (finite); log_decay_offset: scalar <= 0 (finite; log c_a of RRI);
  window: None or an int >= 1. Traced scalars are accepted without value checks. The config
  fields of the same mitigations are checked with the same rules
  (``mamba2_jax.mitigations.validate``).
  """
  s = _concrete_scalar(dt_scale, "dt_scale")
  if s is not None and not is_positive_finite(s):
    raise ValueError(f"ssd: dt_scale must be a finite scalar > 0; got {dt_scale!r}")
  o = _concrete_scalar(log_decay_offset, "log_decay_offset")
  if o is not None and not (math.isfinite(o) and o <= 0):
    raise ValueError(
      f"ssd: log_decay_offset must be a finite scalar <= 0 (log of a decay scale in (0, 1]); "
      f"got {log_decay_offset!r}"
    )
  if window is not None and not is_count(window, 1):
    raise ValueError(f"ssd: window must be None (off) or an int >= 1; got {window!r}")


def _is_const(v, c) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == c


class Prepared(NamedTuple):
  """What an implementation core receives.

  x: (b, L, H, P) in the input dtype; dt: (b, L, H) processed (softplus/bias/clip, then
  times ``dt_scale``) in ``acc``; A: (H,) in ``acc``; B, C: (b, L, G, N) in their input
  dtype; initial_state: (b, H, P, N) in ``acc`` or None; seg: (b, L) int32 monotone run
  index (0 = the run ``initial_state`` applies to) or None; dA: (b, L, H) in ``acc``, the
  per-token log-decay dt * A + log_decay_offset (<= 0). Cores must take the decay from
  ``dA`` (not from dt * A) and pad it with zeros, so padded positions stay identity steps.
  """

  x: jax.Array
  dt: jax.Array
  A: jax.Array
  B: jax.Array
  C: jax.Array
  initial_state: jax.Array | None
  seg: jax.Array | None
  acc: jnp.dtype
  dA: jax.Array | None = None


def prepare_inputs(
  x,
  dt,
  A,
  B,
  C,
  *,
  dt_bias,
  dt_softplus,
  dt_limit,
  initial_state,
  segment_ids,
  dt_scale=1.0,
  log_decay_offset=0.0,
) -> Prepared:
  acc = acc_dtype(x, dt, A, B, C, dt_bias, initial_state)
  dtp = prepare_dt(dt, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, dtype=acc)
  if not _is_const(dt_scale, 1.0):
    dtp = dtp * jnp.asarray(dt_scale, acc)
  A_ = jnp.asarray(A).astype(acc)
  dA = dtp * A_
  if not _is_const(log_decay_offset, 0.0):
    dA = dA + jnp.asarray(log_decay_offset, acc)
  h0 = None if initial_state is None else jnp.asarray(initial_state).astype(acc)
  seg = None if segment_ids is None else segment_runs(segment_ids)
  return Prepared(jnp.asarray(x), dtp, A_, jnp.asarray(B), jnp.asarray(C), h0, seg, acc, dA)


def apply_skip(y, x, D, acc):
  """y + D * x (D of shape (H,) or (H, P)) in ``acc``."""
  if D is None:
    return y
  D_ = jnp.asarray(D).astype(acc)
  if D_.ndim == 1:
    D_ = D_[:, None]
  return y + x.astype(acc) * D_
